"""``fit_warnings``: the warnings a short, quiet fit with the rescaler raised, every one of them (not deduplicated)."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from lightning_accum import SampleCountRescaler


def fit_warnings(
    module: pl.LightningModule, loader: DataLoader, part: str, max_epochs: int = 2, **rescaler: Any
) -> list[str]:
    """The messages containing ``part`` of the warnings that fitting ``module`` on ``loader`` (K = 2) raised."""
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accumulate_grad_batches=2,
        callbacks=[SampleCountRescaler(**rescaler)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    return [str(w.message) for w in caught if part in str(w.message)]
