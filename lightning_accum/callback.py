"""``SampleCountRescaler``: the Lightning callback that makes each optimizer step use the item mean."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.autograd.graph import Node

from lightning_accum.counting import count_dtype, masked_sum_and_count
from lightning_accum.graph import backpropagates_only
from lightning_accum.lookahead import as_count, lookahead_loss_factor, upcoming_batches
from lightning_accum.sampler import GlobalBatchSampler
from lightning_accum.scaling import scale_gradients_, window_rescale_factor
from lightning_accum.support import require_supported_precision, require_supported_strategy
from lightning_accum.window import ItemWindow

MODES = ("deferred", "lookahead")


class SampleCountRescaler(Callback):
    """Make each optimizer step's gradient the mean over all counted items of its window.

    The window is every micro-batch since the last optimizer step, on every rank. The module's
    ``training_step`` returns ``self.sample_loss(losses, mask)`` (or, with manual optimization, calls
    ``self.sample_backward(losses, mask)``; see ``SampleCountMixin``). Two modes reach the same gradient:

    - ``"deferred"`` (default): per optimizer step one all-reduce of ``[loss sum, item count]`` and one
      fused in-place multiply of the gradients, after AMP unscaling and before gradient clipping.
    - ``"lookahead"``: before a window's first micro-batch, its batches are read ahead (held on the host,
      up to ``K - 1`` of them) and counted with ``count_items`` (or the module's ``count_items``), the
      count is all-reduced once, and every micro-batch loss is scaled exactly. Gradients are never
      touched. At the step, one more all-reduce checks that count against the masks ``sample_loss`` saw
      and gives the logged loss.

    A window whose global count is 0 leaves parameters and optimizer state untouched (Lightning still
    counts the step: ``global_step`` and step-interval LR schedulers advance). It logs, per
    optimizer step, ``loss_name`` (the window's global item-mean loss) and ``items_name`` (its global
    item count), and at each epoch end ``epoch_loss_name`` (the item-weighted mean over the epoch). A step
    that fp16 loss scaling skips (inf/nan gradients) still logs its window, whose counts are then dropped.

    Args:
        loss_name: key of the per-step item-mean loss.
        items_name: key of the per-step global item count.
        epoch_loss_name: key of the epoch's item-weighted mean loss.
        prog_bar: show the per-step loss on the progress bar.
        mode: ``"deferred"`` or ``"lookahead"``.
        count_items: look-ahead only: ``count_items(batch) -> Tensor`` (a 0-dim count) for a batch as the
            dataloader yields it and as ``training_step`` receives it; ``None`` uses the module's
            ``count_items`` method. It must count what the ``sample_loss`` masks count (checked each step).

    Example::

        >>> import lightning.pytorch as pl
        >>> rescaler = SampleCountRescaler(loss_name="loss/train")
        >>> trainer = pl.Trainer(accumulate_grad_batches=4, callbacks=[rescaler], logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False)
        >>> SampleCountRescaler(mode="lookahead", count_items=lambda batch: (batch["target"] != -100).sum()).mode
        'lookahead'
    """

    def __init__(
        self,
        loss_name: str = "train/loss",
        items_name: str = "train/items",
        epoch_loss_name: str = "train/loss_epoch",
        prog_bar: bool = True,
        mode: Literal["deferred", "lookahead"] = "deferred",
        count_items: Callable[[Any], Tensor] | None = None,
    ) -> None:
        names = {"loss_name": loss_name, "items_name": items_name, "epoch_loss_name": epoch_loss_name}
        for arg, name in names.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"`{arg}` must be a non-empty string, got {name!r}.")
        if len(set(names.values())) != len(names):
            raise ValueError(f"loss_name, items_name and epoch_loss_name must differ, got {names}.")
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
        if count_items is not None and mode != "lookahead":
            raise ValueError("`count_items` is only used with mode='lookahead'.")
        self.loss_name = loss_name
        self.items_name = items_name
        self.epoch_loss_name = epoch_loss_name
        self.prog_bar = prog_bar
        self.mode = mode
        self.count_items = count_items
        self._start_fit()

    def _start_fit(self) -> None:
        """Forget everything a previous fit left (a fit stopped mid-window leaves a partial window)."""
        self._window = ItemWindow()
        self._items_per_micro_batch: Tensor | None = None
        self._epoch_totals: Tensor | None = None
        self._recorded: list[Node | object] = []  # grad_fn of each sample_loss output since the last backward
        self._lookahead_items: Tensor | None = None  # the window's global count, look-ahead mode
        self._lookahead_k = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(loss_name=self.loss_name, items_name=self.items_name)

    # ------------------------------------------------------------------ validation

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._start_fit()  # before Lightning restores a checkpoint's state into this callback
        from lightning_accum.mixin import SampleCountMixin

        rescalers = [cb for cb in trainer.callbacks if isinstance(cb, SampleCountRescaler)]
        if len(rescalers) > 1:
            raise RuntimeError(
                f"Found {len(rescalers)} SampleCountRescaler callbacks; each would rescale the gradients. "
                "Keep exactly one in Trainer(callbacks=[...])."
            )
        if not isinstance(pl_module, SampleCountMixin):
            raise TypeError(
                f"SampleCountRescaler needs the LightningModule to inherit SampleCountMixin, but "
                f"{type(pl_module).__name__} does not. Declare it as "
                f"`class {type(pl_module).__name__}(SampleCountMixin, L.LightningModule)` and return "
                "`self.sample_loss(losses, mask)` from training_step."
            )
        if self.mode == "lookahead" and not pl_module.automatic_optimization:
            raise RuntimeError(
                "SampleCountRescaler(mode='lookahead') needs automatic optimization, where Lightning decides "
                f"the windows; {type(pl_module).__name__} sets `automatic_optimization = False`. Use the "
                "default mode with `self.sample_backward(losses, mask)` in your training_step."
            )
        require_supported_strategy(trainer.strategy)
        require_supported_precision(trainer.precision_plugin)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise RuntimeError(
                f"SampleCountRescaler needs exactly one optimizer, {type(pl_module).__name__} configures "
                f"{len(trainer.optimizers)}: one window of items cannot serve several optimizer steps."
            )

    # ------------------------------------------------------------------ per micro-batch

    def record(self, pl_module: pl.LightningModule, losses: Tensor, mask: Tensor | None) -> Tensor:
        """Count one micro-batch's items into the window and return the loss to backpropagate."""
        loss_sum, items = masked_sum_and_count(losses, mask)
        self._window.add(loss_sum, items)
        trainer = pl_module.trainer
        if self.mode == "lookahead":
            if self._lookahead_items is None:
                raise RuntimeError("sample_loss was called outside a look-ahead window (no training batch started).")
            factor = lookahead_loss_factor(self._lookahead_k, trainer.world_size, self._lookahead_items)
            return self._recording(loss_sum * factor.to(device=loss_sum.device, dtype=loss_sum.dtype))
        if self._items_per_micro_batch is None:
            # Once per run, on every rank at its first micro-batch: the global mean count, so that
            # all ranks divide by the same constant. It only sets the backward's magnitude.
            mean_items = trainer.strategy.reduce(items.clone(), reduce_op="mean")
            self._items_per_micro_batch = mean_items.clamp_min(1.0)
        # A checkpoint restores float64 on the CPU; counts here are float32 on MPS (no float64 there).
        self._items_per_micro_batch = self._items_per_micro_batch.to(device=items.device, dtype=items.dtype)
        return self._recording(loss_sum / self._items_per_micro_batch.to(loss_sum.dtype))

    def _recording(self, loss: Tensor) -> Tensor:
        # An output without a graph (detached, no_grad) still counted its items: a marker that no backward reaches.
        self._recorded.append(loss.grad_fn if loss.grad_fn is not None else object())
        return loss

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._recorded = []
        if batch_idx == 0 and pl_module.automatic_optimization:
            batch_sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
            if isinstance(batch_sampler, GlobalBatchSampler):
                batch_sampler.require_split(trainer.accumulate_grad_batches, trainer.world_size, trainer.global_rank)
        if self.mode == "lookahead":
            self._count_lookahead_window(trainer, pl_module, batch, batch_idx)

    def _count_lookahead_window(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """At a window's first batch: count it and the window's next batches, then all-reduce once.

        Lightning steps after batch ``b`` when ``(b + 1) % K == 0`` or ``b`` is the epoch's last batch,
        so windows start where ``b % K == 0`` and hold ``K`` batches, or fewer at the epoch's end (data
        exhausted or ``num_training_batches`` reached).
        """
        k = trainer.accumulate_grad_batches
        if batch_idx % k != 0:
            if self._lookahead_items is None:
                raise RuntimeError(
                    f"SampleCountRescaler(mode='lookahead') cannot start in the middle of a window (batch "
                    f"{batch_idx}, K={k}): its first batches were trained before this fit resumed from a "
                    "checkpoint saved mid-window. Save checkpoints at step boundaries "
                    "(ModelCheckpoint(every_n_train_steps=...)), or use the default mode."
                )
            if k != self._lookahead_k:
                raise RuntimeError(
                    f"accumulate_grad_batches changed from {self._lookahead_k} to {k} inside a window "
                    f"(batch {batch_idx}); change it only at epoch start (GradientAccumulationScheduler)."
                )
            return
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if (
            fetcher is None
            or not hasattr(fetcher, "iterator")
            or type(fetcher).__name__ == "_DataLoaderIterDataFetcher"
        ):
            raise RuntimeError(
                "SampleCountRescaler(mode='lookahead') cannot read ahead in this fit loop (a training_step "
                "that takes `dataloader_iter`, or an unknown Lightning version). Use the default mode."
            )
        count = pl_module.count_items if self.count_items is None else self.count_items
        # Lightning also ends the epoch at num_training_batches (limit_train_batches), not only when data runs out.
        ahead = min(k - 1, trainer.num_training_batches - batch_idx - 1)
        counts = [count(b) for b in [batch, *upcoming_batches(fetcher, int(ahead))]]
        device = pl_module.device
        local = torch.stack([as_count(c, device, count_dtype(device)) for c in counts]).sum()
        self._lookahead_items = trainer.strategy.reduce(local, reduce_op="sum")
        self._lookahead_k = k

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        helper = "sample_loss" if pl_module.automatic_optimization else "sample_backward"
        if not self._recorded:
            raise RuntimeError(
                f"{type(pl_module).__name__} backpropagated a loss that did not come from self.{helper}(...). "
                f"Use `self.{helper}(per_item_losses, mask)` so that SampleCountRescaler can count the items."
            )
        if not backpropagates_only(loss, self._recorded):
            raise RuntimeError(
                f"{type(pl_module).__name__} backpropagated more or less than the sum of its "
                f"self.{helper}(...) outputs (a term added or weighted, or a counted loss left out), which the "
                "rescale would mis-weight. Put every term into the per-item losses (a penalty added to each "
                f"item's loss averages to itself: `self.{helper}(item_losses + penalty, mask)`), and use each "
                "output once, unweighted."
            )
        self._recorded = []

    # ------------------------------------------------------------------ per optimizer step

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        totals = self._window.pop(
            reduce_sum=lambda t: trainer.strategy.reduce(t, reduce_op="sum"), device=pl_module.device
        )
        loss_sum, items = totals[0], totals[1]
        expected = self._lookahead_items
        self._lookahead_items = None
        if expected is not None:
            # The one host read per optimizer step: the check and the empty-window decision together.
            verdict = int(2 * (items != expected.to(items)) + (items == 0))
            if verdict >= 2:
                raise RuntimeError(
                    f"count_items counted {float(expected):g} items in the window before "
                    f"global_step={trainer.global_step} but the sample_loss masks counted {float(items):g}. "
                    "Make count_items(batch) apply the same rule as the loss mask."
                )
            empty = verdict == 1
        else:
            empty = bool(items == 0)  # the one host read per optimizer step: skipping needs a host decision
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if empty:
            for p in params:
                p.grad = None
            rank_zero_warn(
                f"Optimizer step at global_step={trainer.global_step} saw no counted items on any rank "
                "(every mask was empty): skipped the update, optimizer state left untouched.",
                category=UserWarning,
            )
            # nan, not nothing: Lightning would otherwise re-log the previous step's cached loss.
            self._log_step(pl_module, torch.full_like(items, float("nan")), items)
            return
        if self.mode == "deferred":
            k = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            factor = window_rescale_factor(k, trainer.world_size, self._items_per_micro_batch, items)
            scale_gradients_([p.grad for p in params if p.grad is not None], factor)
        epoch = self._epoch_totals
        self._epoch_totals = totals if epoch is None else epoch.to(totals) + totals
        self._log_step(pl_module, loss_sum / items, items)

    def _log_step(self, pl_module: pl.LightningModule, loss: Tensor, items: Tensor) -> None:
        log = pl_module.log
        log(self.loss_name, loss.float(), on_step=True, on_epoch=False, prog_bar=self.prog_bar, batch_size=1)
        log(self.items_name, items.float(), on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------ per epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch_totals is None:
            return
        loss_sum, items = self._epoch_totals[0], self._epoch_totals[1]
        self._epoch_totals = None
        # The value is already global and equal on every rank: a max over ranks returns it bit for bit,
        # and saying sync_dist tells Lightning it is not a per-rank value (one small all-reduce per epoch).
        pl_module.log(
            self.epoch_loss_name,
            (loss_sum / items).float(),
            on_step=False,
            on_epoch=True,
            batch_size=1,
            sync_dist=True,
            reduce_fx="max",
        )

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        unit = self._items_per_micro_batch
        epoch = self._epoch_totals
        return {
            "items_per_micro_batch": None if unit is None else float(unit),
            "epoch_loss_sum": 0.0 if epoch is None else float(epoch[0]),
            "epoch_items": 0.0 if epoch is None else float(epoch[1]),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        unit = state_dict["items_per_micro_batch"]
        self._items_per_micro_batch = None if unit is None else torch.tensor(unit, dtype=torch.float64)
        self._epoch_totals = None
        if state_dict["epoch_items"] > 0:
            self._epoch_totals = torch.tensor(
                [state_dict["epoch_loss_sum"], state_dict["epoch_items"]], dtype=torch.float64
            )
