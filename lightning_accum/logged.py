"""``WindowLogger``: what the rescaler logs per optimizer step and per epoch, and the epoch totals it checkpoints."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_accum.counting import count_dtype
from lightning_accum.engines import FinishedWindow
from lightning_accum.logged_names import LoggedNameCheck
from lightning_accum.metrics import ItemMeanLoss


class WindowLogger:
    """Logs each finished window's item-mean loss and item count, and the epoch's item-weighted mean loss.

    The epoch mean is a torchmetrics ``Metric`` of the per-step global totals: already summed over ranks by the
    step's all-reduce, so it does not sync again (and rank 0's state in a checkpoint is the global one).

    Examples:
        >>> WindowLogger("train/loss", "train/items", "train/loss")
        Traceback (most recent call last):
        ...
        ValueError: loss_name, items_name and epoch_loss_name must differ, got ...
    """

    def __init__(self, loss_name: str, items_name: str, epoch_loss_name: str, prog_bar: bool = True) -> None:
        names = {"loss_name": loss_name, "items_name": items_name, "epoch_loss_name": epoch_loss_name}
        for arg, name in names.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"`{arg}` must be a non-empty string, got {name!r}.")
        if len(set(names.values())) != len(names):
            raise ValueError(f"loss_name, items_name and epoch_loss_name must differ, got {names}.")
        self.loss_name, self.items_name, self.epoch_loss_name = loss_name, items_name, epoch_loss_name
        self.prog_bar = prog_bar
        self.epoch_loss = ItemMeanLoss(sync_on_compute=False)
        self.check_names = LoggedNameCheck(loss_name, items_name, epoch_loss_name)

    def start_fit(self, device: torch.device) -> None:
        """Keep the epoch totals on the fit's device, in the counts' dtype."""
        self.epoch_loss = self.epoch_loss.set_dtype(count_dtype(device)).to(device)

    def log(self, pl_module: pl.LightningModule, finished: FinishedWindow) -> None:
        """Log the window (an empty one as ``nan``: Lightning would otherwise re-log the previous value, and warn)."""
        items, per_step = finished.totals.items, {"on_step": True, "on_epoch": False, "batch_size": 1}
        pl_module.log(self.loss_name, finished.mean_loss.float(), prog_bar=self.prog_bar, **per_step)
        pl_module.log(self.items_name, items.float(), **per_step)
        if finished.empty:
            rank_zero_warn(
                f"Optimizer step at global_step={pl_module.trainer.global_step} saw no counted items on any rank "
                "(every mask was empty, or the weights summed to 0): skipped the update, optimizer state left "
                "untouched.",
                category=UserWarning,
            )
        else:
            self.epoch_loss.update(finished.totals.loss_sum, items)
            pl_module.log(
                self.epoch_loss_name,
                self.epoch_loss,
                on_step=False,
                on_epoch=True,
                batch_size=1,
                metric_attribute=self.epoch_loss_name,  # the metric is the rescaler's, not a module attribute
            )
        self.check_names(pl_module.trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_loss_sum": float(self.epoch_loss.loss_sum), "epoch_items": float(self.epoch_loss.items)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch_loss.reset()
        if state_dict["epoch_items"] > 0:
            self.epoch_loss.loss_sum.fill_(state_dict["epoch_loss_sum"])
            self.epoch_loss.items.fill_(state_dict["epoch_items"])
