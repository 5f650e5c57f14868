"""``SampleCountMixin``: gives a LightningModule ``sample_loss`` for per-item losses."""

from __future__ import annotations

import lightning.pytorch as pl
from torch import Tensor

from lightning_accum.callback import SampleCountRescaler
from lightning_accum.counting import masked_sum_and_count


def find_rescaler(trainer: pl.Trainer) -> SampleCountRescaler:
    """Return the trainer's one ``SampleCountRescaler``, or raise an error that says how to add it."""
    rescalers = [cb for cb in trainer.callbacks if isinstance(cb, SampleCountRescaler)]
    if len(rescalers) != 1:
        raise RuntimeError(
            f"sample_loss needs exactly one SampleCountRescaler in the Trainer's callbacks, found "
            f"{len(rescalers)}. Use `Trainer(..., callbacks=[SampleCountRescaler()])`."
        )
    return rescalers[0]


class SampleCountMixin:
    """Mix into a ``LightningModule`` (before it) to return item-weighted losses from ``training_step``.

    ``sample_loss(losses, mask)`` takes one loss per item (any shape) and an optional mask of the items
    that count. During training it hands them to the Trainer's ``SampleCountRescaler``, which makes
    each optimizer step use the mean over all counted items of the window on all ranks. Outside
    training (validation, test) it returns the plain mean over the counted items of the batch.

    Example::

        >>> import torch, torch.nn.functional as F
        >>> import lightning.pytorch as pl
        >>> from lightning_accum import SampleCountRescaler
        >>> class Model(SampleCountMixin, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Linear(3, 1)
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return self.sample_loss(F.mse_loss(self.net(x), y, reduction="none"))
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.randn(10, 1))
        >>> trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[SampleCountRescaler()],
        ...                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)
        >>> trainer.fit(Model(), torch.utils.data.DataLoader(data, batch_size=3))
        >>> trainer.global_step  # 4 micro-batches of 3, 3, 3, 1 samples in 2 windows
        2
    """

    def sample_loss(self, losses: Tensor, mask: Tensor | None = None) -> Tensor:
        """Return the loss that ``training_step`` returns for these per-item ``losses``.

        Args:
            losses: one loss per item, any shape (compute it with ``reduction="none"``).
            mask: same shape as ``losses``, bool or 0/1; ``True``/1 marks the items that count.
                ``None`` counts every item.
        """
        trainer = getattr(self, "_trainer", None)
        if trainer is None or not trainer.training:
            loss_sum, items = masked_sum_and_count(losses, mask)
            return loss_sum / items.to(loss_sum.dtype)
        return find_rescaler(trainer).record(self, losses, mask)
