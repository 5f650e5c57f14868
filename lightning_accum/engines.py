"""One weighting engine per mode: the loss a micro-batch returns, and what happens before the optimizer step.

Both engines count a micro-batch's items only when a backward pass carries its loss (a hook on the loss
they return), and forget them when the gradients are zeroed or the window is dropped (``forget_window``).
So the window's counts always describe the gradients that the optimizer step sees: a loss that is never
backpropagated (a skipped batch, a loss computed for logging) counts nothing. Engines know nothing of
Lightning; ``SampleCountRescaler`` hands them the run's K, world size and collectives in a ``RunState``.

Per optimizer step an engine makes one all-reduce of its window totals and one host read (``int`` of a
verdict that packs every decision), then rescales the gradients in place where its mode needs it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_accum.counting import count_dtype
from lightning_accum.scaling import deferred_loss, lookahead_loss_factor, scale_gradients_, window_rescale_factor
from lightning_accum.window import ItemWindow

EMPTY, RANKS_DISAGREE, WEIGHTS_DIFFER, COUNT_MISMATCH, NOT_ALL_CARRIED = 1, 2, 4, 8, 16
"""Bits of a step's verdict: no item counted; ranks disagree on the epoch ending; the window's sample_loss outputs
were backpropagated with different weights; look-ahead's count differs from the masks'; look-ahead counted
micro-batches that no backward carried."""

WEIGHT_TOLERANCE = 1e-6
"""Relative spread of the gradients reaching the outputs that still counts as one weight (float rounding)."""


@dataclass(frozen=True)
class RunState:
    """What an engine needs to know about the run at a micro-batch or an optimizer step.

    ``accumulate_grad_batches`` is the K that Lightning divides each loss by (1 with manual optimization);
    ``reduce_sum`` and ``reduce_mean`` all-reduce a tensor over the data-parallel ranks.
    """

    accumulate_grad_batches: int
    world_size: int
    device: torch.device
    reduce_sum: Callable[[Tensor], Tensor]
    reduce_mean: Callable[[Tensor], Tensor]

    @classmethod
    def single_process(cls, accumulate_grad_batches: int = 1) -> RunState:
        """A run in one process on the CPU (for examples and tests without a Trainer)."""
        return cls(accumulate_grad_batches, 1, torch.device("cpu"), lambda t: t, lambda t: t)


@dataclass(frozen=True)
class WindowTotals:
    """A finished window's global sum of counted item losses and item count; ``empty``: no item, no update."""

    loss_sum: Tensor
    items: Tensor
    empty: bool


class WeightingEngine(ABC):
    """The interface of both modes: ``micro_batch_loss`` per micro-batch, ``finish_window`` before the step."""

    # Each backward adds [loss sum, items, outputs, sum of g, sum of g^2] to the window, g being the gradient that
    # reaches a sample_loss output: equal for every output of the window (on every rank) when they are summed
    # with one weight, which the step checks as n * sum(g^2) == sum(g)^2.
    totals_size = 5
    resumes_mid_window = True  # a checkpoint inside a window can carry the window's totals and gradients

    def __init__(self) -> None:
        self._window = ItemWindow(self.totals_size)
        self.reset()

    def reset(self) -> None:
        """Forget everything of a previous fit (a fit stopped mid-window leaves a partial window)."""
        self._window.reset()

    def forget_window(self) -> None:
        """The window's gradients were zeroed or dropped: its counts go with them."""
        self._window.reset()

    def partial_window(self) -> Tensor | None:
        """This rank's totals of the window so far, or ``None`` if no backward was carried since it began."""
        return self._window.totals

    def restore_window(self, totals: Tensor) -> None:
        """Continue a window whose first micro-batches a resumed checkpoint carried (their totals on this rank)."""
        self._window.reset()
        self._window.add(totals)

    @abstractmethod
    def micro_batch_loss(self, loss_sum: Tensor, items: Tensor, run: RunState) -> Tensor:
        """The loss to backpropagate for a micro-batch with this sum of counted item losses and item count."""

    def finish_window(
        self, params: Sequence[torch.nn.Parameter], run: RunState, ends_epoch: bool, epoch_batches: float
    ) -> WindowTotals:
        """Before the optimizer step: reduce the window over ranks and make ``params``' gradients the item mean.

        ``ends_epoch`` says whether this window ends the epoch on this rank and ``epoch_batches`` how many
        batches this rank's epoch has (``inf`` if unknown). Ranks whose epochs differ would wait on each other's
        collectives at the epoch's end, so every rank raises instead, at the first step where it shows. An empty
        window sets the gradients to ``None`` (the optimizer then leaves parameters and state untouched).
        """
        local = self._window.take(run.device, count_dtype(run.device))
        known = math.isfinite(epoch_batches)
        n = epoch_batches if known else 0.0
        agreement = torch.empty(4, dtype=local.dtype, device=local.device)
        for i, value in enumerate((float(ends_epoch), float(known), n, n * n)):
            agreement[i] = value  # a fill with a host scalar: no host-to-device copy, so no synchronisation
        totals = run.reduce_sum(torch.cat([local, agreement]))
        verdict = int(self._verdict(totals, run.world_size))  # the one host read per optimizer step
        self._raise_for(verdict, totals, run.world_size)
        if verdict & EMPTY:
            for p in params:
                p.grad = None
        else:
            grads = [p.grad for p in params if p.grad is not None]
            self._rescale(grads, totals, verdict, run)
        return WindowTotals(loss_sum=totals[0], items=totals[1], empty=bool(verdict & EMPTY))

    def _carry(self, loss: Tensor, loss_sum: Tensor, items: Tensor, extra: Callable[[], list[Tensor]] = list) -> Tensor:
        """Add the micro-batch's totals (and ``extra()``) to the window when, and each time, a backward reaches
        ``loss``."""
        if not loss.requires_grad:
            return loss
        counted = loss_sum.detach().to(items)

        def carry(grad: Tensor) -> None:
            g = grad.detach().to(items)
            self._window.add(torch.stack([counted, items, torch.ones_like(g), g, g * g, *extra()]))

        loss.register_hook(carry)
        return loss

    def _verdict(self, totals: Tensor, world_size: int) -> Tensor:
        ranks_ending, ranks_known, n_sum, n_squares = totals[-4], totals[-3], totals[-2], totals[-1]
        # Equal batch counts on every rank <=> R * sum(n^2) == sum(n)^2 (checked when every rank knows its count).
        uneven = (ranks_known == world_size) & (world_size * n_squares != n_sum * n_sum)
        disagree = ((ranks_ending != 0) & (ranks_ending != world_size)) | uneven
        outputs, g_sum, g_squares = totals[2], totals[3], totals[4]
        spread = (outputs * g_squares - g_sum * g_sum).abs() > WEIGHT_TOLERANCE * g_sum * g_sum
        return (totals[1] == 0).int() * EMPTY + disagree.int() * RANKS_DISAGREE + spread.int() * WEIGHTS_DIFFER

    def _raise_for(self, verdict: int, totals: Tensor, world_size: int) -> None:
        """Raise the error that a verdict bit stands for."""
        if verdict & RANKS_DISAGREE:
            raise RuntimeError(
                "The ranks ran different numbers of batches this epoch (their data loaders have different lengths, "
                f"or {int(totals[-4])} of {world_size} ranks ended their epoch at this step): at the epoch's end one "
                "rank would wait forever for the others. Give every rank the same number of batches, e.g. with "
                "GlobalBatchLoader(dataset, GlobalBatchSampler(...)) and Trainer(use_distributed_sampler=False), "
                "which pads short ranks with placeholder samples that count nothing."
            )
        if verdict & WEIGHTS_DIFFER:
            raise RuntimeError(
                "The sample_loss outputs of this window were backpropagated with different weights (e.g. "
                "`2 * self.sample_loss(a) + self.sample_loss(b)`, or a factor that changes between micro-batches or "
                "ranks), but SampleCountRescaler makes every counted item weigh the same. Backpropagate their plain "
                "sum (a constant factor on the whole loss is fine); to weight items, weight the per-item losses."
            )

    @abstractmethod
    def _rescale(self, grads: list[Tensor], totals: Tensor, verdict: int, run: RunState) -> None:
        """Make the accumulated gradients of a non-empty window the item mean."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None


class DeferredEngine(WeightingEngine):
    """Default mode: each micro-batch returns ``S_b / u``; the step multiplies the gradients by ``K R u / N``.

    ``u`` is the global mean item count of the run's first micro-batch (one all-reduce per fit); it only sets
    the backward's magnitude (for fp16) and is kept in checkpoints.

    Example::

        >>> w = torch.ones(2, requires_grad=True)
        >>> engine, run = DeferredEngine(), RunState.single_process(accumulate_grad_batches=2)
        >>> for x in (torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])):
        ...     losses = x @ w                          # one loss per sample
        ...     loss = engine.micro_batch_loss(losses.sum(), torch.tensor(float(len(x)), dtype=torch.float64), run)
        ...     (loss / 2).backward()                   # Lightning divides by K
        >>> totals = engine.finish_window([w], run, ends_epoch=False, epoch_batches=2)
        >>> w.grad, totals.items                        # the mean over the 4 samples
        (tensor([4., 5.]), tensor(4., dtype=torch.float64))
    """

    def reset(self) -> None:
        super().reset()
        self._unit: Tensor | None = None

    def micro_batch_loss(self, loss_sum: Tensor, items: Tensor, run: RunState) -> Tensor:
        if self._unit is None:
            # Once per run, on every rank at its first micro-batch, so that all ranks divide by the same constant.
            self._unit = run.reduce_mean(items.clone()).clamp_min(1.0)
        self._unit = self._unit.to(device=items.device, dtype=items.dtype)  # a checkpoint restores it on the CPU
        return self._carry(deferred_loss(loss_sum, self._unit), loss_sum, items)

    def _rescale(self, grads: list[Tensor], totals: Tensor, verdict: int, run: RunState) -> None:
        assert self._unit is not None, "a window with counted items had a micro-batch loss"
        factor = window_rescale_factor(run.accumulate_grad_batches, run.world_size, self._unit, totals[1])
        scale_gradients_(grads, factor)

    def state_dict(self) -> dict[str, Any]:
        return {"items_per_micro_batch": None if self._unit is None else float(self._unit)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        unit = state_dict["items_per_micro_batch"]
        self._unit = None if unit is None else torch.tensor(unit, dtype=torch.float64)


class LookaheadEngine(WeightingEngine):
    """Look-ahead mode: the window's items are counted before its first backward and each loss is exact.

    ``start_window`` takes this rank's per-micro-batch counts of the window (from ``count_items``) and
    all-reduces their sum once; ``at_micro_batch`` says which batch of the epoch runs next. At the
    step, the counts of the micro-batches that a backward carried are checked against the masks that
    ``sample_loss`` saw. Micro-batches counted ahead but never backpropagated (a skipped batch, an epoch ended
    early) are missing from the gradient; the step then rescales it by ``N_counted / N_carried``.

    Example::

        >>> w = torch.ones(2, requires_grad=True)
        >>> engine, run = LookaheadEngine(), RunState.single_process(accumulate_grad_batches=2)
        >>> batches = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])]
        >>> engine.start_window(torch.tensor([1.0, 3.0], dtype=torch.float64), run)
        >>> for batch_idx, x in enumerate(batches):
        ...     engine.at_micro_batch(batch_idx, run.accumulate_grad_batches)
        ...     loss = engine.micro_batch_loss((x @ w).sum(), torch.tensor(float(len(x)), dtype=torch.float64), run)
        ...     (loss / 2).backward()
        >>> totals = engine.finish_window([w], run, ends_epoch=False, epoch_batches=2)
        >>> w.grad
        tensor([4., 5.])
    """

    totals_size = 6  # the base totals, then the items that count_items counted in the same micro-batches
    resumes_mid_window = False  # the window's look-ahead count cannot be rebuilt: refused at the resumed batch

    def reset(self) -> None:
        super().reset()
        self._counts: Tensor | None = None  # this rank's count of each micro-batch of the window
        self._window_items: Tensor | None = None  # the window's global count
        self._k = 0
        self._offset = 0
        self._carried: set[int] = set()  # offsets of the micro-batches a backward carried

    def forget_window(self) -> None:
        super().forget_window()
        self._carried = set()

    def start_window(self, counts: Tensor, run: RunState) -> None:
        """Start a window whose micro-batches count ``counts`` items on this rank (one all-reduce)."""
        self._counts = counts
        self._window_items = run.reduce_sum(counts.sum())
        self._k = run.accumulate_grad_batches
        self._offset = 0

    def at_micro_batch(self, batch_idx: int, accumulate_grad_batches: int) -> None:
        """Batch ``batch_idx`` of the epoch runs next; raise if it continues a window this engine did not start."""
        offset = batch_idx % accumulate_grad_batches
        if offset and self._window_items is None:
            raise RuntimeError(
                f"SampleCountRescaler(mode='lookahead') cannot start in the middle of a window (batch {batch_idx}, "
                f"K={accumulate_grad_batches}): its first batches were trained before this fit resumed from a "
                "checkpoint saved mid-window. Save checkpoints at step boundaries "
                "(ModelCheckpoint(every_n_train_steps=...)), or use the default mode."
            )
        if offset and accumulate_grad_batches != self._k:
            raise RuntimeError(
                f"accumulate_grad_batches changed from {self._k} to {accumulate_grad_batches} inside a window "
                f"(batch {batch_idx}); change it only at epoch start (GradientAccumulationScheduler)."
            )
        self._offset = offset

    def micro_batch_loss(self, loss_sum: Tensor, items: Tensor, run: RunState) -> Tensor:
        if self._window_items is None or self._counts is None:
            raise RuntimeError("sample_loss was called outside a look-ahead window (no training batch started).")
        factor = lookahead_loss_factor(self._k, run.world_size, self._window_items)
        loss = loss_sum * factor.to(device=loss_sum.device, dtype=loss_sum.dtype)
        offset = self._offset
        expected = self._counts[offset].to(items)

        def count_items_total() -> list[Tensor]:
            # A micro-batch's count_items total counts once, however many sample_loss outputs it backpropagates.
            first = offset not in self._carried
            self._carried.add(offset)
            return [expected * first]

        return self._carry(loss, loss_sum, items, count_items_total)

    def finish_window(
        self, params: Sequence[torch.nn.Parameter], run: RunState, ends_epoch: bool, epoch_batches: float
    ) -> WindowTotals:
        try:
            return super().finish_window(params, run, ends_epoch, epoch_batches)
        finally:
            # The window's count stays until the next window starts: a sample_loss after the step (logging in
            # on_train_batch_end) scales by it and, never backpropagated, counts nothing.
            self._carried = set()

    def _verdict(self, totals: Tensor, world_size: int) -> Tensor:
        assert self._window_items is not None, "finish_window follows start_window"
        items, expected = totals[1], totals[5]  # then the 4 entries of the ranks' agreement
        mismatch = (items != expected).int() * COUNT_MISMATCH
        not_all_carried = (items != self._window_items.to(items)).int() * NOT_ALL_CARRIED
        return super()._verdict(totals, world_size) + mismatch + not_all_carried

    def _raise_for(self, verdict: int, totals: Tensor, world_size: int) -> None:
        super()._raise_for(verdict, totals, world_size)
        if verdict & COUNT_MISMATCH:
            raise RuntimeError(
                f"count_items counted {float(totals[5]):g} items in the micro-batches of this window that were "
                f"backpropagated, but their sample_loss masks counted {float(totals[1]):g}. Make count_items(batch) "
                "apply the same rule as the loss mask."
            )

    def _rescale(self, grads: list[Tensor], totals: Tensor, verdict: int, run: RunState) -> None:
        if verdict & NOT_ALL_CARRIED:
            assert self._window_items is not None
            scale_gradients_(grads, self._window_items.to(totals) / totals[1])
