"""Plain-PyTorch reference: each optimizer step uses the mean loss over the union of its window's items.

Nothing here imports lightning_accum: the reference is computed independently of the code under test.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

# A micro-batch is (inputs, targets, mask); mask is None or bool with the targets' shape.
MicroBatch = tuple[Tensor, Tensor, Tensor | None]


def item_losses(model: nn.Module, batch: MicroBatch) -> tuple[Tensor, Tensor]:
    """Per-item cross-entropy losses and the bool mask of the items that count (all when mask is None)."""
    x, y, mask = batch
    logits = model(x)
    losses = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    losses = losses.reshape(y.shape)
    return losses, torch.ones_like(y, dtype=torch.bool) if mask is None else mask.bool()


@dataclass
class ReferenceRun:
    """Final parameters and, per window, its item-mean loss (nan when empty) and item count."""

    parameters: Tensor
    step_losses: list[float] = field(default_factory=list)
    step_items: list[int] = field(default_factory=list)


def train_reference(
    model: nn.Module,
    windows: Sequence[Sequence[MicroBatch]],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    clip_norm: float | None = None,
    clip_value: float | None = None,
) -> ReferenceRun:
    """Train a copy of ``model``: one optimizer step per window on the mean over all its counted items.

    A window with no counted item makes no step at all (parameters and optimizer state untouched).
    """
    model = copy.deepcopy(model)
    optimizer = make_optimizer(model)
    run = ReferenceRun(parameters=torch.empty(0))
    for window in windows:
        total, items = torch.zeros(()), 0
        for batch in window:
            losses, mask = item_losses(model, batch)
            total = total + losses[mask].sum()
            items += int(mask.sum())
        if items == 0:  # no step; recorded so that logs can be compared window by window
            run.step_losses.append(float("nan"))
            run.step_items.append(0)
            continue
        optimizer.zero_grad()
        (total / items).backward()
        if clip_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        if clip_value is not None:
            nn.utils.clip_grad_value_(model.parameters(), clip_value)
        optimizer.step()
        run.step_losses.append(float(total.detach()) / items)
        run.step_items.append(items)
    run.parameters = flat_parameters(model)
    return run


def split_into_windows(micro_batches: Sequence[MicroBatch], k: int) -> list[list[MicroBatch]]:
    """Consecutive windows of ``k`` micro-batches; the last one may be shorter."""
    return [list(micro_batches[i : i + k]) for i in range(0, len(micro_batches), k)]


def merge_ranks(per_rank_windows: Sequence[Sequence[Sequence[MicroBatch]]]) -> list[list[MicroBatch]]:
    """Union over ranks of each window: window i holds every rank's micro-batches of its window i."""
    counts = {len(windows) for windows in per_rank_windows}
    assert len(counts) == 1, f"ranks disagree on the number of windows: {counts}"
    return [[mb for windows in per_rank_windows for mb in windows[i]] for i in range(counts.pop())]


def flat_parameters(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def relative_distance(parameters: Tensor, reference: Tensor, initial: Tensor) -> float:
    """``|theta - theta_ref| / |theta_ref - theta_0|``: the error as a fraction of the whole update."""
    return float((parameters - reference).norm() / (reference - initial).norm())
