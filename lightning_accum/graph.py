"""Which losses a backward pass propagates: the ``sample_loss`` outputs, summed, up to one overall scale.

Lightning divides the returned loss by K and a GradScaler multiplies it by its scale; both scale every
item alike, so the rescale stays exact. Anything else on the way (a regulariser added, one loss weighted
against another, a difference, a counted loss left out) would be rescaled as if it were item losses, and
so be mis-weighted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from torch import Tensor
from torch.autograd.graph import Node

# A node with one differentiable input that multiplies it by a constant (or casts it) keeps item weights equal.
_UNIFORM_SCALE_NODES = ("MulBackward0", "DivBackward0", "ToCopyBackward0")


def _is_plain_add(node: Node) -> bool:
    return type(node).__name__ == "AddBackward0" and getattr(node, "_saved_alpha", 1) == 1


def _summed_terms(node: Node, recorded: Sequence[object]) -> list[Node] | None:
    """The terms of a tree of plain additions down to recorded outputs; ``None`` if another node is in it."""
    if node in recorded:
        return [node]
    if not _is_plain_add(node):
        return None
    terms: list[Node] = []
    for child, _ in node.next_functions:
        if child is None:  # a constant added: no gradient
            continue
        child_terms = _summed_terms(child, recorded)
        if child_terms is None:
            return None
        terms += child_terms
    return terms


def backpropagates_only(loss: Tensor, recorded: Sequence[object]) -> bool:
    """True if ``loss`` is a constant multiple of the sum of all recorded outputs, each taken once.

    ``recorded`` holds the ``grad_fn`` of each tensor that ``sample_loss`` returned since the last backward.
    Constants added to the loss are allowed (they have no gradient); anything that weights the recorded
    outputs unequally, or leaves one out, is not.

    Example::

        >>> import torch
        >>> w = torch.ones(3, requires_grad=True)
        >>> a, b = (w * 2).sum(), (w * 3).sum()
        >>> backpropagates_only(a / 4, [a.grad_fn]), backpropagates_only((a + b) * 8.0 + 1.0, [a.grad_fn, b.grad_fn])
        (True, True)
        >>> backpropagates_only(a + 0.1 * w.square().sum(), [a.grad_fn]), backpropagates_only(a, [a.grad_fn, b.grad_fn])
        (False, False)
    """
    node = loss.grad_fn
    while node is not None and node not in recorded:
        children = [child for child, _ in node.next_functions]
        differentiable = [child for child in children if child is not None]
        if type(node).__name__ in _UNIFORM_SCALE_NODES and len(differentiable) == 1 and children[0] is not None:
            node = children[0]  # the scaled operand (for a division, the numerator)
        elif _is_plain_add(node) and len(differentiable) == 1:
            node = differentiable[0]  # a constant added
        else:
            break
    terms = None if node is None else _summed_terms(node, recorded)
    return terms is not None and Counter(map(id, terms)) == Counter(map(id, recorded))
