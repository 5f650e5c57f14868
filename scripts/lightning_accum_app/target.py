"""``StopAtTarget``: steps and samples to a target training loss, for the critical-batch sweep."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_accum import GradientNoiseScale


class StopAtTarget(Callback):
    """After every optimizer step: the whole training set's item-mean cross entropy; stop at the first step where
    it is at most ``target``, and write what it took to ``path`` (rank 0, at the fit's end).

    The data module's ``train_set`` holds the inputs and labels as tensors ``x`` and ``y`` (the digits data
    does). ``path`` gets ``target``, ``reached``, and at the target: ``steps``, ``samples`` (the items of the
    steps so far, from ``SampleCountRescaler``'s per-step count), ``k`` (the K then in force) and ``noise_scale``
    (``GradientNoiseScale``'s smoothed ``B_simple``; ``nan`` without one or before its first estimate).

    Args:
        target: the training loss to reach.
        path: the JSON file to write.

    Examples:
        >>> StopAtTarget(target=0.25, path="target.json").target
        0.25
    """

    def __init__(self, target: float, path: str | Path) -> None:
        self.target = target
        self.path = Path(path)
        self.samples = 0.0
        self.step = 0
        self.reached: dict[str, float] | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.reached is not None or trainer.global_step == self.step:
            return
        self.step = trainer.global_step
        self.samples += float(trainer.callback_metrics["train/items"])
        data = trainer.datamodule.train_set  # type: ignore[attr-defined]
        with torch.no_grad():
            loss = float(torch.nn.functional.cross_entropy(pl_module(data.x), data.y))
        if loss <= self.target:
            noise = [c for c in trainer.callbacks if isinstance(c, GradientNoiseScale)]  # type: ignore[attr-defined]
            self.reached = {
                "steps": trainer.global_step,
                "samples": self.samples,
                "k": trainer.accumulate_grad_batches,
                "noise_scale": float(noise[0].noise_scale) if noise else float("nan"),
            }
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            record = {"target": self.target, "reached": self.reached is not None, **(self.reached or {})}
            self.path.write_text(json.dumps(record, indent=1) + "\n")
