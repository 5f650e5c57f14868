"""``GradientNoiseScale`` (the item-exact gradient noise scale, logged per step) and ``NoiseScaleAccumulation``.

The small batches whose gradient norms the estimate needs (``noise_scale`` has the math):

- several ranks (DDP): each rank's own window gradient, before the data-parallel reduction, over the rank's
  exact item count; its squared norm is taken bucket by bucket in a DDP communication hook that then runs
  DDP's default all-reduce;
- one process with K > 1: the gradient after the window's first micro-batch, over that micro-batch's items,
  taken when the second micro-batch starts.

The step's gradient is the exact item mean over the window's global count; its squared norm is taken once over
all ranks (each rank its ``1/R`` share, before the step's rescale, scaled back after it). The small-batch totals
and the shares ride in the step's one all-reduce (the engine's ``WindowObserver`` protocol); no host read happens
per micro-batch. Checkpoints carry the running window's measured first micro-batch (one process).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from lightning_accum.callback import SampleCountRescaler
from lightning_accum.counting import count_dtype
from lightning_accum.engines import FinishedWindow
from lightning_accum.noise_scale import (
    SmallBatchTotals,
    SmoothedNoiseScale,
    gradient_share,
    noise_estimates,
    small_batch,
    squared_norm,
)
from lightning_accum.totals import WindowTotals


class _BucketSquares:
    """A DDP communication hook's state: the squared norm of this rank's gradient buckets before the all-reduce."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.total: Tensor | None = None

    def take(self, device: torch.device) -> Tensor:
        total, self.total = self.total, None
        return torch.zeros((), device=device, dtype=self.dtype) if total is None else total


def _squares_then_allreduce(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks real annotations, if any
    """A DDP communication hook (``state``: ``_BucketSquares``; ``bucket``: a ``GradBucket``)."""
    squares = torch.linalg.vector_norm(bucket.buffer().detach(), dtype=state.dtype).square()
    state.total = squares if state.total is None else state.total + squares
    return allreduce_hook(None, bucket)  # type: ignore[arg-type]  # DDP's default: the world group's mean


def _rescaler(trainer: pl.Trainer) -> SampleCountRescaler:
    found = [c for c in trainer.callbacks if isinstance(c, SampleCountRescaler)]  # type: ignore[attr-defined]
    if not found:
        raise RuntimeError(
            "GradientNoiseScale measures the exact item counts that SampleCountRescaler keeps: add "
            "SampleCountRescaler() to Trainer(callbacks=[...]) beside it."
        )
    return found[0]


class GradientNoiseScale(Callback):
    """Log the simple gradient noise scale ``B_simple = tr(Σ) / |G|²`` per optimizer step, from exact item counts.

    Used beside ``SampleCountRescaler``. Per step it measures small-batch gradient norms with their item counts
    (each rank's window on several ranks; the first micro-batch of the window in one process with K > 1) and the
    step's exact gradient, forms the unbiased estimates of ``|G|²`` and ``tr(Σ)`` (``lightning_accum.noise_scale``),
    smooths each with a bias-corrected moving average and logs them with their ratio. With K = 1 in one process
    there is no smaller batch: it warns once and logs nothing. Cost per step and rank on R ranks: one fused norm
    of the rank's window gradient (in a DDP communication hook) and one of its ``1/R`` share of the step's gradient,
    four values in the step's existing all-reduce; in one process two fused norms (the first micro-batch's
    gradient, the window's). Per-item ``weight=`` and ``batch_loss`` terms are refused (no item-mean small batch).

    Args:
        smoothing: decay of the moving averages, in [0, 1) (0: each step's own estimate).
        name: key of ``B_simple``.
        grad_squared_name: key of the smoothed ``|G|²``.
        trace_name: key of the smoothed ``tr(Σ)``.

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_accum import SampleCountRescaler
        >>> from lightning_accum.demos import MLPModel, RegressionDataModule
        >>> data = RegressionDataModule(num_samples=64, num_val_samples=3, num_features=4, micro_batch_size=5)
        >>> trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=4, logger=False,
        ...                      callbacks=[SampleCountRescaler(), GradientNoiseScale(smoothing=0.9)],
        ...                      enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False, limit_val_batches=0)
        >>> trainer.fit(MLPModel(in_features=4, out_features=1, task="regression"), datamodule=data)
        >>> sorted(k for k in trainer.callback_metrics if k.startswith("train/noise"))
        ['train/noise_scale', 'train/noise_scale_grad_squared', 'train/noise_scale_trace']
    """

    def __init__(
        self,
        smoothing: float = 0.99,
        name: str = "train/noise_scale",
        grad_squared_name: str = "train/noise_scale_grad_squared",
        trace_name: str = "train/noise_scale_trace",
    ) -> None:
        self.smoothed = SmoothedNoiseScale(smoothing)
        self.name, self.grad_squared_name, self.trace_name = name, grad_squared_name, trace_name
        self.items = torch.zeros(())  # the last step's global item count
        self._rescaler: SampleCountRescaler | None = None
        self._pl_module: pl.LightningModule | None = None
        self._buckets: _BucketSquares | None = None
        self._first: SmallBatchTotals | None = None  # one process: the window's first micro-batch
        self._share = (0, 1)  # (rank, ranks): this rank's share of the step's gradient norm
        self._warned = False

    @property
    def noise_scale(self) -> Tensor:
        """The smoothed ``B_simple`` (``nan`` before the first estimate), on the fit's device."""
        return self.smoothed.noise_scale

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise RuntimeError("GradientNoiseScale supports automatic optimization only; remove it for manual loops.")
        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise RuntimeError(
                f"GradientNoiseScale reads whole local gradients: use one device or strategy='ddp' / 'ddp_spawn', not "
                f"{type(trainer.strategy).__name__} (sharded gradients have no local norm without a collective)."
            )
        if str(trainer.precision) == "16-mixed":
            raise RuntimeError(
                "GradientNoiseScale would read fp16 gradients before the loss scaler unscales them: use "
                "precision='bf16-mixed' or '32-true'."
            )
        self._rescaler = _rescaler(trainer)
        self._first = None  # a checkpoint restored after setup may carry a window's first micro-batch
        if self not in self._rescaler.engine.observers:
            self._rescaler.engine.observers.append(self)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pl_module = pl_module
        self._share = (trainer.global_rank, trainer.world_size)
        self.smoothed.sums = self.smoothed.sums.to(pl_module.device)
        self.smoothed.weight = self.smoothed.weight.to(pl_module.device)
        if trainer.world_size > 1:
            self._buckets = _BucketSquares(count_dtype(pl_module.device))
            try:
                trainer.strategy.model.register_comm_hook(self._buckets, _squares_then_allreduce)  # type: ignore[union-attr]
            except RuntimeError as err:
                raise RuntimeError(
                    "GradientNoiseScale reads each rank's gradient in a DDP communication hook, and this model "
                    f"already has one ({err}). Remove DDPStrategy(ddp_comm_hook=...) or GradientNoiseScale."
                ) from err

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._rescaler is not None and self in self._rescaler.engine.observers:
            self._rescaler.engine.observers.remove(self)
        self._pl_module = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.world_size > 1:
            return
        k = trainer.accumulate_grad_batches
        if k == 1 and not self._warned:
            self._warned = True
            rank_zero_warn(
                "GradientNoiseScale has no smaller batch to compare with at K=1 in one process: it logs nothing "
                "until K > 1 (or run on several ranks).",
                category=UserWarning,
            )
        if k > 1 and batch_idx % k == 1:  # the first micro-batch's gradient, before the second adds to it
            self._first = self._small_batch(self._rescaler_window(), [p.grad for p in pl_module.parameters()])

    def _rescaler_window(self) -> WindowTotals:
        assert self._rescaler is not None, "attached at setup"
        engine = self._rescaler.engine
        device = engine.run.device
        packed = engine.window.packed
        if packed is None:
            return WindowTotals.zeros(device, count_dtype(device))
        return WindowTotals.unpack(packed)

    def _small_batch(self, window: WindowTotals, grads: list[Tensor | None]) -> SmallBatchTotals:
        assert self._rescaler is not None, "attached at setup"
        engine = self._rescaler.engine
        if engine.window.packed is None:  # no backward yet: nothing to measure in this window
            return SmallBatchTotals.zeros(window.items.device, window.items.dtype)
        squared = squared_norm([g for g in grads if g is not None], window.items.dtype).to(window.items.device)
        return small_batch(squared, window, engine.loss_factor())

    # ------------------------------------------------------------------ the engine's WindowObserver protocol

    def loss_form(self, form: str) -> None:
        """Refuse the loss forms whose small-batch gradient is not an item mean over a known count."""
        if form == "weight":
            raise RuntimeError(
                "GradientNoiseScale cannot estimate the noise scale with sample_loss(..., weight=...): a weighted "
                "mean's variance is tr(Σ)·sum(w²)/sum(w)², not tr(Σ)/b, and the window's totals carry sum(w), not "
                "sum(w²). Remove GradientNoiseScale, or give unit weights through mask=."
            )
        raise RuntimeError(
            "GradientNoiseScale cannot estimate the noise scale with batch_loss(...) terms: their gradient is a mean "
            "over micro-batches, not items, so a small batch's gradient is no item mean over its count. Remove "
            "GradientNoiseScale, or put the term into the per-item losses of sample_loss."
        )

    def local_totals(self, local: WindowTotals, params: Sequence[torch.nn.Parameter]) -> Tensor:
        """This rank's small batch of the window, then the squared norm of its share of the step's gradient (before
        the step's rescale); zeros, without reading the gradients, for a window without a small batch (one process
        with K = 1, or a window of one micro-batch)."""
        if self._buckets is not None:
            assert self._rescaler is not None, "attached at setup"
            small = small_batch(self._buckets.take(local.items.device), local, self._rescaler.engine.loss_factor())
        else:
            small, self._first = self._first, None
        if small is None:
            return local.items.new_zeros(SmallBatchTotals.size() + 1)
        share = squared_norm(gradient_share(params, *self._share), local.items.dtype).to(local.items)
        return torch.cat([small.pack().to(local.items), share.unsqueeze(0)])

    def reduced(self, summed: Tensor, finished: FinishedWindow, scale: Tensor) -> None:
        """Estimate, smooth and log from the ranks' small batches and the step's gradient's squared norm."""
        items = finished.totals.items
        small, share = summed[: SmallBatchTotals.size()], summed[SmallBatchTotals.size()]
        big_squared = share * scale.to(share).square()
        grad_squared, trace, valid = noise_estimates(SmallBatchTotals.unpack(small), big_squared, items)
        self.smoothed.update(grad_squared, trace, valid & ~torch.tensor(finished.empty, device=items.device))
        self.items = items
        module = self._pl_module
        if module is None or (self._buckets is None and module.trainer.accumulate_grad_batches == 1):
            return
        per_step = {"on_step": True, "on_epoch": False, "batch_size": 1}
        module.log(self.name, self.smoothed.noise_scale.float(), **per_step)
        module.log(self.grad_squared_name, self.smoothed.grad_squared.float(), **per_step)
        module.log(self.trace_name, self.smoothed.trace.float(), **per_step)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The moving averages, and in one process the running window's first micro-batch once it was measured
        (a checkpoint inside a window resumes the window's estimate exactly)."""
        first = None if self._first is None else self._first.pack().tolist()
        return {"sums": self.smoothed.sums.tolist(), "weight": float(self.smoothed.weight), "first": first}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.smoothed.sums = torch.tensor(state_dict["sums"], dtype=self.smoothed.sums.dtype)
        self.smoothed.weight = torch.tensor(state_dict["weight"], dtype=self.smoothed.weight.dtype)
        first = state_dict.get("first")
        self._first = None if first is None else SmallBatchTotals.unpack(torch.tensor(first, dtype=torch.float64))


class NoiseScaleAccumulation(Callback):
    """Raise K at epoch ends while the smoothed noise scale exceeds the global batch, within ``[min_k, max_k]``.

    At each epoch's end it reads ``GradientNoiseScale``'s smoothed ``B_simple`` (one host read per epoch) and,
    if it exceeds the epoch's largest global item count of a step ``N`` (a full window), sets
    ``trainer.accumulate_grad_batches`` to ``min(max_k, ceil(K * B_simple / N))`` for the next epoch; it never
    lowers K. A data module that cuts windows
    (``GlobalBatchSampler``) must build each epoch's loader for ``trainer.accumulate_grad_batches``
    (``Trainer(reload_dataloaders_every_n_epochs=1)``; the demo data modules do with
    ``accumulate_grad_batches=None``). In one process start at ``min_k >= 2``: K = 1 has no small batch.

    Args:
        min_k: the K of the first epoch.
        max_k: the largest K it sets.

    Examples:
        >>> NoiseScaleAccumulation(min_k=4, max_k=2)
        Traceback (most recent call last):
        ...
        ValueError: NoiseScaleAccumulation needs 1 <= min_k <= max_k, got min_k=4, max_k=2.
    """

    def __init__(self, min_k: int = 2, max_k: int = 64) -> None:
        if not 1 <= min_k <= max_k:
            raise ValueError(f"NoiseScaleAccumulation needs 1 <= min_k <= max_k, got min_k={min_k}, max_k={max_k}.")
        self.min_k, self.max_k = min_k, max_k
        self.history: list[tuple[int, int, float]] = []  # (epoch, K for the next epoch, B_simple read)
        self._largest = torch.zeros(())  # the epoch's largest step, in items (on the device: no host read)

    def _noise(self, trainer: pl.Trainer) -> GradientNoiseScale:
        found = [c for c in trainer.callbacks if isinstance(c, GradientNoiseScale)]  # type: ignore[attr-defined]
        if not found:
            raise RuntimeError("NoiseScaleAccumulation follows GradientNoiseScale: add GradientNoiseScale() too.")
        return found[0]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._noise(trainer)
        if trainer.current_epoch == 0:
            trainer.accumulate_grad_batches = self.min_k

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        items = self._noise(trainer).items
        self._largest = torch.maximum(self._largest.to(items), items)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        noise = self._noise(trainer)
        k = trainer.accumulate_grad_batches
        scale, items = float(noise.noise_scale), float(self._largest)  # the host reads of the epoch
        self._largest = torch.zeros(())
        if math.isfinite(scale) and items > 0 and scale > items:
            k = max(k, min(self.max_k, math.ceil(k * scale / items)))
        if k != trainer.accumulate_grad_batches:
            rank_zero_info(f"NoiseScaleAccumulation: B_simple={scale:.1f} > {items:g} items per step: K -> {k}.")
        trainer.accumulate_grad_batches = k
        self.history.append((trainer.current_epoch, k, scale))

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [tuple(h) for h in state_dict["history"]]  # type: ignore[misc]
