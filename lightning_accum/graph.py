"""What a backward pass propagates: ``sample_loss`` outputs only, and every one that has a graph.

The walk goes from the loss down the autograd graph and stops at ``sample_loss`` outputs. Any operation may
combine them on the way (a sum in any spelling, a constant factor, a clone); a path that reaches a parameter
without passing through an output is a term added to the loss, which the rescale would mis-weight. Whether
the outputs are combined with equal weights is checked separately, from the gradients that reach them (see
``engines``). Outputs without a graph (computed under ``torch.no_grad()`` or detached, e.g. for logging)
are never backpropagated, so they count nothing and are not required.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

from torch import Tensor
from torch.autograd.graph import Node


class GraphProblem(Enum):
    """Why a backward pass cannot be weighted item by item."""

    NO_GRAPH = "no autograd graph"
    ADDED_TERM = "a term that is no sample_loss output"
    LEFT_OUT = "a sample_loss output left out"


def backward_problem(loss: Tensor, outputs: Sequence[Node]) -> GraphProblem | None:
    """The problem with backpropagating ``loss``, given the ``grad_fn`` of the ``sample_loss`` outputs since the
    last backward (those with a graph); ``None`` if it propagates into the parameters through them alone.

    Example::

        >>> import torch
        >>> w = torch.ones(3, requires_grad=True)
        >>> a, b = (w * 2).sum(), (w * 3).sum()
        >>> backward_problem(torch.stack([a, b]).sum() * torch.tensor(4.0), [a.grad_fn, b.grad_fn]) is None
        True
        >>> backward_problem(a + 0.1 * w.square().sum(), [a.grad_fn]).name
        'ADDED_TERM'
        >>> backward_problem(a, [a.grad_fn, b.grad_fn]).name
        'LEFT_OUT'
        >>> with torch.no_grad():
        ...     backward_problem((w * 2).sum(), []).name
        'NO_GRAPH'
    """
    if loss.grad_fn is None:
        return GraphProblem.NO_GRAPH
    targets = {id(node) for node in outputs}
    reached: set[int] = set()
    seen: set[int] = set()
    stack: list[Node] = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in targets:
            reached.add(id(node))
            continue
        if type(node).__name__ == "AccumulateGrad":  # a parameter reached without a sample_loss output
            return GraphProblem.ADDED_TERM
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return GraphProblem.LEFT_OUT if reached != targets else None
