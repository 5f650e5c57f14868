"""The backward contract: a backward carries ``sample_loss`` outputs only, every one that has a graph, with one weight.

``batch_loss`` outputs (extra terms, each normalised by the window's micro-batch count) are the second kind of
recorded output: a backward may carry them beside the ``sample_loss`` outputs, with any factor of their own.

``BackwardContract`` owns the whole rule and its messages. It records each ``sample_loss`` output of a
micro-batch (``record``), and at the backward (``check``) walks the autograd graph from the loss down, stopping
at those outputs: any operation may combine them on the way (a sum in any spelling, a constant factor, a
clone), but a path that reaches a parameter without passing through an output is a term added to the loss,
which the rescale would mis-weight. Outputs without a graph (computed under ``torch.no_grad()`` or detached,
e.g. for logging) are never backpropagated, so they count nothing and are not required.

Whether the outputs were combined with equal weights shows only in the gradient ``g`` that reaches each of
them, on every rank: each backward adds ``gradient_totals(g)`` to the window, and ``weights_differ`` reads the
step's all-reduced sums (``n * sum(g ** 2) == sum(g) ** 2`` exactly when every ``g`` is equal).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

from torch import Tensor
from torch.autograd.graph import Node

from lightning_accum.totals import WindowTotals

WEIGHT_TOLERANCE = 1e-6
"""Relative spread of the gradients reaching the outputs that still counts as one weight (float rounding)."""


class GraphProblem(Enum):
    """Why a backward pass cannot be weighted item by item."""

    NO_GRAPH = "no autograd graph"
    ADDED_TERM = "a term that is no sample_loss output"
    LEFT_OUT = "a sample_loss output left out"


def backward_problem(loss: Tensor, outputs: Sequence[Node]) -> GraphProblem | None:
    """The problem with backpropagating ``loss``, given the ``grad_fn`` of the ``sample_loss`` outputs since the
    last backward (those with a graph); ``None`` if it propagates into the parameters through them alone.

    Examples:
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


def gradient_totals(grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """What the backward reaching one output adds to the window's ``outputs``, ``grad_sum``, ``grad_squares``."""
    return grad.new_ones(()), grad, grad * grad


def weights_differ(totals: WindowTotals) -> Tensor:
    """True (0-dim bool) when the window's outputs, on all ranks, were backpropagated with different weights.

    Examples:
        >>> import torch
        >>> def window(*gs):
        ...     parts = [torch.stack(gradient_totals(torch.tensor(g, dtype=torch.float64))) for g in gs]
        ...     outputs, grad_sum, grad_squares = torch.stack(parts).sum(0)
        ...     zero = outputs.new_zeros(())
        ...     return WindowTotals(zero, zero, outputs, grad_sum, grad_squares, zero, zero, zero)
        >>> bool(weights_differ(window(0.25, 0.25, 0.25))), bool(weights_differ(window(0.25, 0.5)))
        (False, True)
    """
    spread = totals.outputs * totals.grad_squares - totals.grad_sum * totals.grad_sum
    return spread.abs() > WEIGHT_TOLERANCE * totals.grad_sum * totals.grad_sum


class BackwardContract:
    """Records a micro-batch's ``sample_loss`` outputs and refuses a backward that breaks the contract.

    ``module_name`` and ``helper`` (``"sample_loss"``, or ``"sample_backward"`` under manual optimization) name
    what the messages point at.

    Examples:
        >>> import torch
        >>> w = torch.ones(2, requires_grad=True)
        >>> contract = BackwardContract("Model")
        >>> contract.start_micro_batch()
        >>> out = (w * 3).sum()
        >>> contract.record(out)
        >>> contract.check(out + w.sum())
        Traceback (most recent call last):
        ...
        RuntimeError: Model backpropagated a term that is not a self.sample_loss(...) output ...
    """

    def __init__(self, module_name: str = "The LightningModule", helper: str = "sample_loss") -> None:
        self.module_name = module_name
        self.helper = helper
        self.start_micro_batch()

    def start_micro_batch(self) -> None:
        """Forget the outputs of earlier micro-batches."""
        self._outputs: list[Node] = []  # grad_fn of each output with a graph since the last backward
        self._calls = 0  # sample_loss calls since the last backward
        self._terms: list[Node] = []  # grad_fn of each batch_loss output with a graph since the last backward

    def record(self, output: Tensor) -> None:
        """Note one ``sample_loss`` output (one without a graph is only logged, and never backpropagated)."""
        self._calls += 1
        if output.grad_fn is not None:
            self._outputs.append(output.grad_fn)

    def record_term(self, output: Tensor) -> None:
        """Note one ``batch_loss`` output: a backward may carry it beside the ``sample_loss`` outputs."""
        if output.grad_fn is not None:
            self._terms.append(output.grad_fn)

    def check(self, loss: Tensor) -> None:
        """Raise, naming the fix, unless ``loss`` propagates through all recorded outputs with a graph, and only
        through them. The outputs are then forgotten: the next backward needs outputs of its own."""
        outputs, calls = self._outputs + self._terms, self._calls + len(self._terms)
        self.start_micro_batch()
        name, helper = self.module_name, self.helper
        if not calls:
            raise RuntimeError(
                f"{name} backpropagated a loss that did not come from self.{helper}(...). "
                f"Use `self.{helper}(per_item_losses, mask)` so that SampleCountRescaler can count the items."
            )
        problem = backward_problem(loss, outputs)
        if problem is GraphProblem.NO_GRAPH:
            raise RuntimeError(
                f"{name} backpropagated a loss without an autograd graph: its per-item losses were computed under "
                "torch.no_grad() or detached, so no gradient reaches the parameters. Compute them with gradients "
                f"enabled before self.{helper}(...)."
            )
        if problem is GraphProblem.ADDED_TERM:
            raise RuntimeError(
                f"{name} backpropagated a term that is not a self.{helper}(...) output (e.g. a regulariser added to "
                "the loss), which the rescale would weight as if it were item losses. Pass a per-batch term through "
                f"self.batch_loss(term) (its mean over the window's micro-batches, mode='lookahead'): "
                f"`self.{helper}(item_losses, mask) + 0.01 * self.batch_loss(aux)`, or put it into the per-item "
                f"losses (a penalty added to each item's loss averages to itself: "
                f"`self.{helper}(item_losses + penalty, mask)`)."
            )
        if problem is GraphProblem.LEFT_OUT:
            raise RuntimeError(
                f"{name} computed {len(outputs)} self.{helper}(...) outputs with a graph since the last backward "
                "(self.batch_loss(...) outputs included) but backpropagated only some of them. Backpropagate the "
                "plain sum of all of them, or compute the ones you only log under torch.no_grad()."
            )

    def weights_message(self) -> str:
        """The error for a window whose outputs were backpropagated with different weights."""
        return (
            f"The {self.helper} outputs of this window were backpropagated with different weights (e.g. "
            f"`2 * self.{self.helper}(a) + self.{self.helper}(b)`, or a factor that changes between micro-batches or "
            "ranks), but SampleCountRescaler makes every counted item weigh the same. Backpropagate their plain "
            "sum (a constant factor on the whole loss is fine); to weight items, weight the per-item losses."
        )
