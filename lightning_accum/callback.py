"""``SampleCountRescaler``: the Lightning callback that makes each optimizer step use the item mean."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_accum.counting import masked_sum_and_count
from lightning_accum.scaling import scale_gradients_, window_rescale_factor
from lightning_accum.window import ItemWindow

SUPPORTED_STRATEGIES: tuple[type[Strategy], ...] = (SingleDeviceStrategy, DDPStrategy)


def require_supported_strategy(strategy: Strategy) -> None:
    """Raise unless the rescale can see the summed gradients of ``strategy`` before its optimizer step.

    Example::

        >>> from lightning.pytorch.strategies import SingleDeviceStrategy
        >>> require_supported_strategy(SingleDeviceStrategy("cpu"))
    """
    if not isinstance(strategy, SUPPORTED_STRATEGIES):
        raise RuntimeError(
            f"SampleCountRescaler does not support the {type(strategy).__name__} strategy yet: it must "
            "see the summed gradients before the optimizer step. Use a single device or "
            "strategy='ddp' / 'ddp_spawn'."
        )


class SampleCountRescaler(Callback):
    """Rescale each optimizer step's gradient to the mean over all counted items of its window.

    The window is every micro-batch since the last optimizer step, on every rank. The module's
    ``training_step`` must return ``self.sample_loss(losses, mask)`` (see ``SampleCountMixin``).
    Per optimizer step the callback does one all-reduce of ``[loss sum, item count]`` and one fused
    in-place multiply of the gradients, after AMP unscaling and before gradient clipping. A window
    whose global count is 0 leaves parameters and optimizer state untouched.

    It logs, per optimizer step, ``loss_name`` (the window's global item-mean loss) and
    ``items_name`` (its global item count), and at each epoch end ``epoch_loss_name`` (the
    item-weighted mean over the epoch).

    Args:
        loss_name: key of the per-step item-mean loss.
        items_name: key of the per-step global item count.
        epoch_loss_name: key of the epoch's item-weighted mean loss.
        prog_bar: show the per-step loss on the progress bar.

    Example::

        >>> import lightning.pytorch as pl
        >>> rescaler = SampleCountRescaler(loss_name="loss/train")
        >>> trainer = pl.Trainer(accumulate_grad_batches=4, callbacks=[rescaler], logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        loss_name: str = "train/loss",
        items_name: str = "train/items",
        epoch_loss_name: str = "train/loss_epoch",
        prog_bar: bool = True,
    ) -> None:
        names = {"loss_name": loss_name, "items_name": items_name, "epoch_loss_name": epoch_loss_name}
        for arg, name in names.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"`{arg}` must be a non-empty string, got {name!r}.")
        if len(set(names.values())) != len(names):
            raise ValueError(f"loss_name, items_name and epoch_loss_name must differ, got {names}.")
        self.loss_name = loss_name
        self.items_name = items_name
        self.epoch_loss_name = epoch_loss_name
        self.prog_bar = prog_bar
        self._window = ItemWindow()
        self._items_per_micro_batch: Tensor | None = None
        self._epoch_totals: Tensor | None = None
        self._losses_this_batch = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(loss_name=self.loss_name, items_name=self.items_name)

    # ------------------------------------------------------------------ validation

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
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
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "SampleCountRescaler works with automatic optimization only; "
                f"{type(pl_module).__name__} sets `automatic_optimization = False`. Remove that line, "
                "or drop the callback and average by item count yourself."
            )
        require_supported_strategy(trainer.strategy)

    # ------------------------------------------------------------------ per micro-batch

    def record(self, pl_module: pl.LightningModule, losses: Tensor, mask: Tensor | None) -> Tensor:
        """Count one micro-batch's items into the window and return the loss for ``training_step``."""
        loss_sum, items = masked_sum_and_count(losses, mask)
        if self._items_per_micro_batch is None:
            # Once per run, on every rank at its first micro-batch: the global mean count, so that
            # all ranks divide by the same constant. It only sets the backward's magnitude.
            mean_items = pl_module.trainer.strategy.reduce(items.clone(), reduce_op="mean")
            self._items_per_micro_batch = mean_items.clamp_min(1.0)
        self._items_per_micro_batch = self._items_per_micro_batch.to(items.device)
        unit = self._items_per_micro_batch.to(loss_sum.dtype)
        self._window.add(loss_sum, items)
        self._losses_this_batch += 1
        return loss_sum / unit

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._losses_this_batch = 0

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._losses_this_batch == 0:
            raise RuntimeError(
                f"{type(pl_module).__name__}.training_step returned a loss that did not come from "
                "self.sample_loss(...). Return `self.sample_loss(per_item_losses, mask)` so that "
                "SampleCountRescaler can count the items."
            )

    # ------------------------------------------------------------------ per optimizer step

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        totals = self._window.pop(
            reduce_sum=lambda t: trainer.strategy.reduce(t, reduce_op="sum"), device=pl_module.device
        )
        loss_sum, items = totals[0], totals[1]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if bool(items == 0):  # the one host read per optimizer step: skipping needs a host decision
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
        factor = window_rescale_factor(
            trainer.accumulate_grad_batches, trainer.world_size, self._items_per_micro_batch, items
        )
        scale_gradients_([p.grad for p in params if p.grad is not None], factor)
        epoch = self._epoch_totals
        self._epoch_totals = totals if epoch is None else epoch.to(totals.device) + totals
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
        pl_module.log(self.epoch_loss_name, (loss_sum / items).float(), on_step=False, on_epoch=True, batch_size=1)

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
        if state_dict["epoch_items"] > 0:
            self._epoch_totals = torch.tensor(
                [state_dict["epoch_loss_sum"], state_dict["epoch_items"]], dtype=torch.float64
            )
