"""One weighting engine per mode: a window's whole life, from its first micro-batch to the optimizer step.

The protocol (``WeightingEngine``), in the order a fit calls it:

- ``begin_fit(run)``: the fit's constants (``run.Run``), once per fit;
- ``start_micro_batch(batch_idx, batch, upcoming, padding)``: a training batch starts (look-ahead counts a
  window's items here, reading its batches with ``upcoming``); ``padding(position)`` says which of the epoch's
  micro-batches are padding, which count 0 items (and no ``batch_loss`` term) whatever their masks say;
- ``micro_batch_loss(loss_sum, items, weighted)``: the loss ``sample_loss`` returns for a micro-batch's counted
  loss sum and item count (with per-item weights: the weighted sum and the weight sum);
- ``batch_term(term)``: the loss ``batch_loss`` returns for a per-micro-batch term (look-ahead mode only);
- ``check_backward(loss)``: what a backward carries (``contract.BackwardContract``);
- ``forget_window()``: the gradients were zeroed;
- ``finish_window(params, ends_epoch, epoch_batches)``: before the optimizer step, after AMP unscaling: one
  all-reduce of the window's totals, one host read of the verdict, the gradients made the item mean;
- ``stepped_unfinished()``: after an optimizer step, whether it bypassed ``finish_window``;
- ``state_dict()`` / ``load_state_dict()``; ``partial_window()`` / ``restore_window()`` for a checkpoint inside
  a window.

Both engines count a micro-batch's items only when a backward pass carries its loss (a hook on the loss they
return), and forget them when the gradients are zeroed or the window is dropped, so the window's counts always
describe the gradients that the optimizer step sees. Engines know nothing of Lightning.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_accum.contract import BackwardContract, gradient_totals, weights_differ
from lightning_accum.counting import count_dtype
from lightning_accum.lookahead import as_count
from lightning_accum.run import Run
from lightning_accum.scaling import deferred_loss, lookahead_loss_factor, scale_gradients_, window_rescale_factor
from lightning_accum.totals import EpochAgreement, Verdict, WindowTotals
from lightning_accum.window import ItemWindow

WEIGHT_SUM_TOLERANCE = 1e-5
"""Look-ahead with per-item weights: the relative difference between count_items' and the loss's weight sums
that still counts as equal (float32 summation order); unweighted counts must match exactly."""

Upcoming = Callable[[int], Sequence[Any]]
"""``upcoming(n)``: the next ``n`` batches of the epoch (fewer at its end), read without consuming them."""

Padding = Callable[[int], bool]
"""``padding(position)``: whether the epoch's micro-batch at ``position`` (its ``batch_idx``) is padding."""


def _nothing(loss: Tensor) -> Tensor:
    """0, keeping ``loss``'s graph (a backward still runs through it, with gradient 0)."""
    return torch.where(torch.zeros((), dtype=torch.bool, device=loss.device), loss, 0.0)


def no_padding(position: int) -> bool:
    """The ``Padding`` of data without padding micro-batches."""
    return False


class WindowObserver(Protocol):
    """Adds packed quantities of its own to the step's one all-reduce and reads them back summed over ranks.

    ``engine.observers`` holds them; ``finish_window`` concatenates each observer's ``local_totals`` after the
    window's totals (no second collective) and hands back the reduced slice once the gradients are final.
    """

    def loss_form(self, form: str) -> None:
        """A micro-batch's loss uses ``form`` (``"weight"``: per-item weights; ``"batch_loss"``: a per-micro-batch
        term); raise here to refuse it (called in ``training_step``, before its backward)."""

    def local_totals(self, local: WindowTotals, params: Sequence[torch.nn.Parameter]) -> Tensor:
        """This rank's 1-D vector (``local``'s device and dtype, a fixed length per observer); ``params``' gradients
        are the window's after the data-parallel reduction and before the step's rescale."""

    def reduced(self, summed: Tensor, finished: FinishedWindow, scale: Tensor) -> None:
        """The vector summed over ranks, the finished window, and ``scale``: the factor the step multiplied the
        gradients by (the final gradient is ``scale`` times the one ``local_totals`` saw)."""


@dataclass(frozen=True)
class FinishedWindow:
    """A finished window's global totals (over all ranks) and its verdict."""

    totals: WindowTotals
    verdict: Verdict

    @property
    def empty(self) -> bool:
        """No item counted on any rank: no update was made."""
        return bool(self.verdict & Verdict.EMPTY)

    @property
    def mean_loss(self) -> Tensor:
        """The window's item-mean loss; ``nan`` for an empty window (Lightning would re-log a stale value)."""
        if self.empty:
            return torch.full_like(self.totals.items, float("nan"))
        return self.totals.loss_sum / self.totals.items


class WeightingEngine(ABC):
    """A window's life in one mode (see the module docstring for the protocol)."""

    resumes_mid_window = True  # a checkpoint inside a window can carry the window's totals and gradients

    def __init__(self) -> None:
        self.window = ItemWindow()
        self.observers: list[WindowObserver] = []
        self.begin_fit(Run.single_process())

    def begin_fit(self, run: Run) -> None:
        """Start a fit: its constants, and nothing left of a previous fit (one stopped mid-window)."""
        self.run = run
        self.contract = BackwardContract(run.module_name, run.helper)
        self.window.reset()
        self._finished = False
        self._padding = False  # the running micro-batch is padding

    def start_micro_batch(self, batch_idx: int, batch: Any, upcoming: Upcoming, padding: Padding = no_padding) -> None:
        """Training batch ``batch_idx`` of the epoch starts (``batch``: as ``training_step`` receives it)."""
        self.contract.start_micro_batch()
        self._padding = padding(batch_idx)

    def micro_batch_loss(self, loss_sum: Tensor, items: Tensor, weighted: bool = False) -> Tensor:
        """The loss to backpropagate for a micro-batch with this sum of counted item losses and item count
        (``weighted``: per-item weights made them ``sum(w * loss)`` and ``sum(w)``).

        A padding micro-batch counts nothing: its sum is 0 (a graph without gradient) and its count 0.
        """
        if weighted:
            for observer in self.observers:
                observer.loss_form("weight")
        if self._padding:
            loss_sum, items = _nothing(loss_sum), torch.zeros_like(items)
        loss = self._loss(loss_sum, items)
        self.contract.record(loss)
        if loss.requires_grad:  # one without a graph is only logged: a backward never carries it
            counted = loss_sum.detach().to(items)
            expected = self._expected_items()

            def carry(grad: Tensor) -> None:  # each time, and only when, a backward reaches this loss
                g = grad.detach().to(items)
                expected_items = items.new_zeros(()) if expected is None else expected().to(items)
                zero = items.new_zeros(())
                totals = WindowTotals(counted, items, *gradient_totals(g), expected_items, zero + weighted, zero)
                self.window.add(totals.pack())

            loss.register_hook(carry)
        return loss

    def batch_term(self, term: Tensor) -> Tensor:
        """The loss to backpropagate for ``term``, a 0-dim tensor whose gradient counts as its mean over the
        window's micro-batches on all ranks."""
        for observer in self.observers:
            observer.loss_form("batch_loss")
        loss = self._term_loss(_nothing(term) if self._padding else term)
        self.contract.record_term(loss)
        if loss.requires_grad:
            device = self.run.device

            def carry(grad: Tensor) -> None:
                totals = WindowTotals.zeros(device, count_dtype(device))
                self.window.add(dataclasses.replace(totals, term_outputs=totals.term_outputs + 1).pack())

            loss.register_hook(carry)
        return loss

    def _term_loss(self, term: Tensor) -> Tensor:
        """The mode's ``batch_loss`` output (default mode: refused)."""
        raise RuntimeError(
            "self.batch_loss(term) needs SampleCountRescaler(mode='lookahead'): the default mode learns the "
            "window's size only at its optimizer step, after the term's gradient has been summed with the items'. "
            "Use SampleCountRescaler(mode='lookahead') (and count_items), or put the term into the per-item losses."
        )

    def check_backward(self, loss: Tensor) -> None:
        """Raise, naming the fix, unless ``loss`` carries this micro-batch's outputs as the contract says."""
        self.contract.check(loss)

    def forget_window(self) -> None:
        """The window's gradients were zeroed or dropped: its counts go with them."""
        self.window.reset()

    def finish_window(
        self, params: Sequence[torch.nn.Parameter], ends_epoch: bool, epoch_batches: float
    ) -> FinishedWindow:
        """Before the optimizer step: reduce the window over ranks and make ``params``' gradients the item mean.

        ``ends_epoch`` says whether this window ends the epoch on this rank and ``epoch_batches`` how many
        batches this rank's epoch has (``inf`` if unknown). Ranks whose epochs differ would wait on each other's
        collectives at the epoch's end, so every rank raises instead, at the first step where it shows. An empty
        window sets the gradients to ``None`` (the optimizer then leaves parameters and state untouched).
        """
        device = self.run.device
        local = self.window.take(device, count_dtype(device))
        agreement = EpochAgreement.of_rank(ends_epoch, epoch_batches, local.device, local.dtype)
        extras = [observer.local_totals(WindowTotals.unpack(local), params) for observer in self.observers]
        reduced = self.run.reduce_sum(torch.cat([local, agreement.pack(), *extras]))
        totals = WindowTotals.unpack(reduced[: WindowTotals.size()])
        agreement = EpochAgreement.unpack(reduced[WindowTotals.size() : WindowTotals.size() + EpochAgreement.size()])
        verdict = Verdict(int(Verdict.of(**self._flags(totals, agreement))))  # the one host read per step
        self._raise_for(verdict, totals, agreement)
        scale = torch.ones_like(totals.items)
        if verdict & Verdict.EMPTY:
            for p in params:
                p.grad = None
        else:
            scale = self._rescale([p.grad for p in params if p.grad is not None], totals, verdict)
        self._finished = True
        finished = FinishedWindow(totals, verdict)
        summed = reduced[WindowTotals.size() + EpochAgreement.size() :].split([len(e) for e in extras])
        for observer, vector in zip(self.observers, summed, strict=True):
            observer.reduced(vector, finished, scale)
        return finished

    def stepped_unfinished(self) -> bool:
        """After an optimizer step: True if it stepped without ``finish_window`` (its gradient was not rescaled)."""
        finished, self._finished = self._finished, False
        return not finished

    def partial_window(self) -> Tensor | None:
        """This rank's packed ``WindowTotals`` so far, or ``None`` if no backward was carried since it began."""
        return self.window.packed

    def restore_window(self, packed: Tensor) -> None:
        """Continue a window whose first micro-batches a resumed checkpoint carried (their totals on this rank)."""
        self.window.reset()
        self.window.add(packed)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None

    @abstractmethod
    def _loss(self, loss_sum: Tensor, items: Tensor) -> Tensor:
        """The mode's micro-batch loss."""

    @abstractmethod
    def loss_factor(self) -> Tensor:
        """``c``: the running window's micro-batch losses are ``c * S_b`` (a backward adds ``c * g * grad(S_b)``)."""

    def _expected_items(self) -> Callable[[], Tensor] | None:
        """What a backward of the current micro-batch adds to ``expected_items`` (called when it runs); None: 0."""
        return None

    def _flags(self, totals: WindowTotals, agreement: EpochAgreement) -> dict[str, Tensor]:
        """The verdict's flags, as 0-dim bool tensors on the device."""
        return {
            "EMPTY": totals.items == 0,
            "RANKS_DISAGREE": agreement.disagree(self.run.world_size),
            "WEIGHTS_DIFFER": weights_differ(totals),
        }

    def _raise_for(self, verdict: Verdict, totals: WindowTotals, agreement: EpochAgreement) -> None:
        """Raise the error that a verdict flag stands for."""
        if verdict & Verdict.RANKS_DISAGREE:
            raise RuntimeError(
                "The ranks ran different numbers of batches this epoch (their data loaders have different lengths, "
                f"or {int(agreement.ranks_ending)} of {self.run.world_size} ranks ended their epoch at this step): at "
                "the epoch's end one rank would wait forever for the others. Give every rank the same number of "
                "batches, e.g. with GlobalBatchLoader(dataset, GlobalBatchSampler(...)) and "
                "Trainer(use_distributed_sampler=False), which pads short ranks with padding micro-batches that count "
                "nothing."
            )
        if verdict & Verdict.WEIGHTS_DIFFER:
            raise RuntimeError(self.contract.weights_message())

    @abstractmethod
    def _rescale(self, grads: list[Tensor], totals: WindowTotals, verdict: Verdict) -> Tensor:
        """Make the accumulated gradients of a non-empty window the item mean; return the factor applied."""


class DeferredEngine(WeightingEngine):
    """Default mode: each micro-batch returns ``S_b / u``; the step multiplies the gradients by ``K R u / N``.

    ``u`` is the global mean item count of the run's first micro-batch (one all-reduce per fit); it only sets
    the backward's magnitude (for fp16) and is kept in checkpoints.

    Examples:
        >>> w = torch.ones(2, requires_grad=True)
        >>> engine = DeferredEngine()
        >>> engine.begin_fit(Run.single_process(accumulate_grad_batches=2))
        >>> for x in (torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])):
        ...     losses = x @ w                          # one loss per sample
        ...     loss = engine.micro_batch_loss(losses.sum(), torch.tensor(float(len(x)), dtype=torch.float64))
        ...     (loss / 2).backward()                   # Lightning divides by K
        >>> finished = engine.finish_window([w], ends_epoch=False, epoch_batches=2)
        >>> w.grad, finished.totals.items               # the mean over the 4 samples
        (tensor([4., 5.]), tensor(4., dtype=torch.float64))
    """

    def begin_fit(self, run: Run) -> None:
        super().begin_fit(run)
        self._unit: Tensor | None = None

    def _loss(self, loss_sum: Tensor, items: Tensor) -> Tensor:
        if self._unit is None:
            # Once per run, on every rank at its first micro-batch, so that all ranks divide by the same constant.
            self._unit = self.run.reduce_mean(items.clone()).clamp_min(1.0)
        self._unit = self._unit.to(device=items.device, dtype=items.dtype)  # a checkpoint restores it on the CPU
        return deferred_loss(loss_sum, self._unit)

    def loss_factor(self) -> Tensor:
        assert self._unit is not None, "a micro-batch loss was computed"
        return 1.0 / self._unit

    def _rescale(self, grads: list[Tensor], totals: WindowTotals, verdict: Verdict) -> Tensor:
        assert self._unit is not None, "a window with counted items had a micro-batch loss"
        run = self.run
        factor = window_rescale_factor(run.accumulate_grad_batches, run.world_size, self._unit, totals.items)
        scale_gradients_(grads, factor)
        return factor

    def state_dict(self) -> dict[str, Any]:
        return {"items_per_micro_batch": None if self._unit is None else float(self._unit)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        unit = state_dict["items_per_micro_batch"]
        self._unit = None if unit is None else torch.tensor(unit, dtype=torch.float64)


class LookaheadEngine(WeightingEngine):
    """Look-ahead mode: the window's items are counted before its first backward and each loss is exact.

    At a window's first micro-batch, ``start_micro_batch`` reads the window's batches (``upcoming``), counts
    them with ``run.count_items`` and all-reduces the total once. At the step, the counts of the micro-batches
    that a backward carried are checked against the masks that ``sample_loss`` saw. Micro-batches counted ahead
    but never backpropagated (a skipped batch, an epoch ended early) are missing from the gradient; the step
    then rescales it by ``N_counted / N_carried``.

    Examples:
        >>> w = torch.ones(2, requires_grad=True)
        >>> engine = LookaheadEngine()
        >>> run = Run.single_process(accumulate_grad_batches=2)
        >>> run.count_items = len
        >>> engine.begin_fit(run)
        >>> batches = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])]
        >>> for batch_idx, x in enumerate(batches):
        ...     engine.start_micro_batch(batch_idx, x, upcoming=lambda n: batches[batch_idx + 1 :][:n])
        ...     loss = engine.micro_batch_loss((x @ w).sum(), torch.tensor(float(len(x)), dtype=torch.float64))
        ...     (loss / 2).backward()
        >>> w.grad, engine.finish_window([w], ends_epoch=False, epoch_batches=2).totals.items
        (tensor([4., 5.]), tensor(4., dtype=torch.float64))
    """

    resumes_mid_window = False  # the window's look-ahead count cannot be rebuilt: refused at the resumed batch

    def begin_fit(self, run: Run) -> None:
        super().begin_fit(run)
        self._counts: Tensor | None = None  # this rank's count of each micro-batch of the window
        self._window_items: Tensor | None = None  # the window's global count
        self._window_batches: Tensor | None = None  # the window's micro-batches on all ranks
        self._k = 0  # the K the window was counted for
        self._offset = 0  # the running micro-batch's position in the window
        self._carried: set[int] = set()  # offsets of the micro-batches a backward carried

    def forget_window(self) -> None:
        super().forget_window()
        self._carried = set()

    def start_micro_batch(self, batch_idx: int, batch: Any, upcoming: Upcoming, padding: Padding = no_padding) -> None:
        super().start_micro_batch(batch_idx, batch, upcoming, padding)
        k = self.run.accumulate_grad_batches
        offset = batch_idx % k
        if offset == 0:
            batches = [batch, *upcoming(k - 1)]
            self._count_window(batches, [padding(batch_idx + i) for i in range(len(batches))])
        elif self._window_items is None:
            raise RuntimeError(
                f"SampleCountRescaler(mode='lookahead') cannot start in the middle of a window (batch {batch_idx}, "
                f"K={k}): its first batches were trained before this fit resumed from a checkpoint saved "
                "mid-window. Save checkpoints at step boundaries (ModelCheckpoint(every_n_train_steps=...)), or use "
                "the default mode."
            )
        elif k != self._k:
            raise RuntimeError(
                f"accumulate_grad_batches changed from {self._k} to {k} inside a window (batch {batch_idx}); change "
                "it only at epoch start (GradientAccumulationScheduler)."
            )
        self._offset = offset

    def _count_window(self, batches: Sequence[Any], padding: Sequence[bool]) -> None:
        """Count the window's micro-batches on this rank (padding ones as 0) and all-reduce their total (one
        collective)."""
        count_items = self.run.count_items
        if count_items is None:
            raise RuntimeError("LookaheadEngine needs run.count_items, the rule that counts a batch's items.")
        device, dtype = self.run.device, count_dtype(self.run.device)
        counts = [
            torch.zeros((), dtype=dtype, device=device) if pad else as_count(count_items(b), device, dtype)
            for b, pad in zip(batches, padding, strict=True)
        ]
        self._counts = torch.stack(counts)
        real = torch.full((), padding.count(False), dtype=dtype, device=device)  # no host-to-device copy
        self._window_items, self._window_batches = self.run.reduce_sum(torch.stack([self._counts.sum(), real]))
        self._k = self.run.accumulate_grad_batches

    def _loss(self, loss_sum: Tensor, items: Tensor) -> Tensor:
        if self._window_items is None:
            raise RuntimeError("sample_loss was called outside a look-ahead window (no training batch started).")
        factor = lookahead_loss_factor(self._k, self.run.world_size, self._window_items)
        return loss_sum * factor.to(device=loss_sum.device, dtype=loss_sum.dtype)

    def _term_loss(self, term: Tensor) -> Tensor:
        if self._window_batches is None:
            raise RuntimeError("batch_loss was called outside a look-ahead window (no training batch started).")
        factor = (self._k * self.run.world_size) / self._window_batches
        return term * factor.to(device=term.device, dtype=term.dtype)

    def loss_factor(self) -> Tensor:
        assert self._window_items is not None, "a micro-batch loss was computed"
        return lookahead_loss_factor(self._k, self.run.world_size, self._window_items)

    def _expected_items(self) -> Callable[[], Tensor] | None:
        assert self._counts is not None, "a loss is computed inside a counted window"
        offset, expected = self._offset, self._counts[self._offset]

        def counted_once() -> Tensor:
            # A micro-batch's count_items total counts once, however many sample_loss outputs it backpropagates.
            first = offset not in self._carried
            self._carried.add(offset)
            return expected * first

        return counted_once

    def finish_window(
        self, params: Sequence[torch.nn.Parameter], ends_epoch: bool, epoch_batches: float
    ) -> FinishedWindow:
        try:
            return super().finish_window(params, ends_epoch, epoch_batches)
        finally:
            # The window's count stays until the next window starts: a sample_loss after the step (logging in
            # on_train_batch_end) scales by it and, never backpropagated, counts nothing.
            self._carried = set()

    def _flags(self, totals: WindowTotals, agreement: EpochAgreement) -> dict[str, Tensor]:
        assert self._window_items is not None, "finish_window follows a counted window"
        # Weight sums that count_items and the loss add in different orders may differ in the last bits.
        tolerance = torch.where(totals.weighted_outputs > 0, WEIGHT_SUM_TOLERANCE * totals.expected_items.abs(), 0.0)
        not_all_carried = totals.items != self._window_items.to(totals.items)
        return {
            **super()._flags(totals, agreement),
            "COUNT_MISMATCH": (totals.items - totals.expected_items).abs() > tolerance,
            "NOT_ALL_CARRIED": not_all_carried,
            "TERMS_NOT_ALL_CARRIED": not_all_carried & (totals.term_outputs > 0),
        }

    def _raise_for(self, verdict: Verdict, totals: WindowTotals, agreement: EpochAgreement) -> None:
        super()._raise_for(verdict, totals, agreement)
        if verdict & Verdict.TERMS_NOT_ALL_CARRIED:
            raise RuntimeError(
                "Some micro-batches that look-ahead counted for this window never reached a backward, in a window "
                "with self.batch_loss(...) terms: their terms' mean over the window's micro-batches would be wrong. "
                "Backpropagate every micro-batch of the window (do not return None from training_step)."
            )
        if verdict & Verdict.COUNT_MISMATCH:
            raise RuntimeError(
                f"count_items counted {float(totals.expected_items):g} items in the micro-batches of this window that "
                f"were backpropagated, but their sample_loss masks counted {float(totals.items):g}. Make "
                "count_items(batch) apply the same rule as the loss mask."
            )

    def _rescale(self, grads: list[Tensor], totals: WindowTotals, verdict: Verdict) -> Tensor:
        if not verdict & Verdict.NOT_ALL_CARRIED:
            return torch.ones_like(totals.items)
        assert self._window_items is not None
        factor = self._window_items.to(totals.items) / totals.items
        scale_gradients_(grads, factor)
        return factor


ENGINES: dict[str, type[WeightingEngine]] = {"deferred": DeferredEngine, "lookahead": LookaheadEngine}
"""The engine of each ``SampleCountRescaler`` mode."""
