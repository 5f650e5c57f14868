"""``ItemsSeenHistory``: the training loss of every optimizer step against the items seen so far."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

HISTORY_COLUMNS = ("step", "items_seen", "loss")


class ItemsSeenHistory(Callback):
    """Record ``(optimizer step, items seen, window loss)`` per step; rank 0 writes them as CSV at fit end.

    It reads the loss and item count that ``SampleCountRescaler`` logs (global over all ranks), so the
    history is the same whatever the number of ranks. Windows with no counted item are left out.
    Checkpoints keep the rows, so a run resumed from one continues the count and writes the whole history;
    a checkpoint saved at a training batch end (``every_n_train_steps``) misses its last step's row.

    Args:
        path: CSV file to write.
        loss_name: logged per-step loss key.
        items_name: logged per-step item count key.

    Examples:
        >>> history = ItemsSeenHistory("history.csv")
        >>> history.load_state_dict({"rows": [[1, 8.0, 2.3]], "items_seen": 8.0, "last_step": 1})  # from a checkpoint
        >>> history.rows
        [(1, 8.0, 2.3)]
    """

    def __init__(self, path: str | Path, loss_name: str = "train/loss", items_name: str = "train/items") -> None:
        self.path = Path(path)
        self.loss_name = loss_name
        self.items_name = items_name
        self.rows: list[tuple[int, float, float]] = []
        self._items_seen = 0.0
        self._last_step = 0

    def _record(self, trainer: pl.Trainer) -> None:
        # Lightning updates callback_metrics after on_train_batch_end, so a step's values are read here,
        # at the next batch start or at train end.
        if trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        metrics = trainer.callback_metrics
        if self.items_name not in metrics or self.loss_name not in metrics:
            return
        items = float(metrics[self.items_name])
        if items == 0:
            return
        self._items_seen += items
        self.rows.append((trainer.global_step, self._items_seen, float(metrics[self.loss_name])))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._record(trainer)

    # Before the checkpoints that ModelCheckpoint saves at validation end or train epoch end.
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows), "items_seen": self._items_seen, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [tuple(row) for row in state_dict["rows"]]
        self._items_seen = state_dict["items_seen"]
        self._last_step = state_dict["last_step"]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer)
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(HISTORY_COLUMNS)
                writer.writerows(self.rows)
