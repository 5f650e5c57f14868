"""A callback that test jobs add through the Hydra app (``+callbacks.slow._target_=slow_steps.SlowStepsFrom``, with
``tests`` on ``PYTHONPATH``) to leave a test time to signal a run at a chosen point; it changes no computation."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl


class SlowStepsFrom(pl.Callback):
    """Sleep ``seconds`` after every training batch from epoch ``epoch`` on."""

    def __init__(self, epoch: int, seconds: float) -> None:
        self.epoch, self.seconds = epoch, seconds

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch >= self.epoch:
            time.sleep(self.seconds)
