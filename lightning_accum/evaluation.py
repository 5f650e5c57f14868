"""``EvaluationMeans``: ``sample_loss`` in ``validation_step`` / ``test_step`` logs the exact mean over the whole set.

Lightning's ``self.log(..., on_epoch=True)`` averages per-batch means weighted by the batch size, so batches of
different token counts (a short last batch, masked padding) skew it, and each rank's share is averaged again.
Here each batch adds its counted loss sum and item count to an ``ItemMeanLoss`` per stage, which Lightning
computes at the epoch's end: one sync of the two sums over all ranks, then ``sum(loss) / sum(items)``, the
item-weighted (token-weighted, or with ``weight`` the weighted) mean over every counted item of the set.
A padding micro-batch of a ``GlobalBatchLoader`` (a rank that ran short) counts nothing, as in training.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_accum.counting import count_dtype, masked_sum_and_count
from lightning_accum.data.loader import each_loader, is_padding
from lightning_accum.metrics import ItemMeanLoss


class EvaluationMeans:
    """Per stage (validation, test) the set's item-weighted mean loss, logged under ``val_loss_name`` /
    ``test_loss_name`` at the epoch's end (all ranks' items pooled).

    Examples:
        >>> EvaluationMeans("val/item_loss", "val/item_loss")
        Traceback (most recent call last):
        ...
        ValueError: val_loss_name and test_loss_name must be different non-empty strings, got ...
    """

    def __init__(self, val_loss_name: str = "val/item_loss", test_loss_name: str = "test/item_loss") -> None:
        names = (val_loss_name, test_loss_name)
        if not all(isinstance(name, str) and name for name in names) or val_loss_name == test_loss_name:
            raise ValueError(f"val_loss_name and test_loss_name must be different non-empty strings, got {names}.")
        self.names = {"validate": val_loss_name, "test": test_loss_name}
        self.metrics = {stage: ItemMeanLoss() for stage in self.names}
        self.padding = False  # the running evaluation batch is a padding micro-batch

    def start_batch(self, loaders: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Note whether the evaluation batch about to run (of the stage's ``loaders``, as Lightning's
        ``trainer.val_dataloaders`` / ``test_dataloaders`` hold them) is a ``GlobalBatchLoader``'s padding."""
        self.padding = is_padding(each_loader(loaders)[dataloader_idx], batch_idx)

    def loss(self, pl_module: pl.LightningModule, losses: Tensor, mask: Tensor | None, weight: Tensor | None) -> Tensor:
        """Add one batch to its stage's mean, log the mean, and return the batch's own item mean (``nan`` if it
        counts no item: empty masks, zero weights, or a padding micro-batch)."""
        trainer = pl_module.trainer
        loss_sum, items = masked_sum_and_count(losses, mask, weight)
        if self.padding:
            loss_sum, items = torch.zeros_like(loss_sum), torch.zeros_like(items)
        batch_mean = loss_sum / items.clamp_min(1).to(loss_sum.dtype)
        batch_mean = batch_mean.where(items > 0, batch_mean.new_full((), float("nan")))
        if not (trainer.validating or trainer.sanity_checking or trainer.testing):
            return batch_mean  # predict, or a call outside Lightning's loops
        stage = "test" if trainer.testing else "validate"
        metric = self.metrics[stage]
        if metric.items.device != items.device:
            self.metrics[stage] = metric = metric.set_dtype(count_dtype(items.device)).to(items.device)
        metric.update(loss_sum.detach(), items)
        name = self.names[stage]
        pl_module.log(name, metric, on_step=False, on_epoch=True, batch_size=1, metric_attribute=name)
        return batch_mean
