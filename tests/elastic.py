"""Fits that stop and resume under another split of the same effective batch (ranks x K x B = 8), and their reference.

The data, optimizer and plain-PyTorch reference are ``test_sampler_resume``'s: 25 samples, windows of E = 8 samples
of ``randperm(SEED + epoch)``, 3 epochs of 4 optimizer steps (the last window holds 1 sample). A module of this file
builds its ``GlobalBatchSampler`` for the Trainer's ranks and its own K and B, optionally grouped by length; the
reference does not depend on the split or the grouping.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from cases import make_net
from fits import QUIET_TRAINER, ranks_strategy
from reference import item_losses
from test_sampler_resume import EPOCHS, SAMPLES, SEED, WHOLE_EPOCH, dataset, final_parameters, make_optimizer
from torch import Tensor

from lightning_accum import GlobalBatchLoader, GlobalBatchSampler, SampleCountMixin, SampleCountRescaler

LENGTHS = [1 + (7 * i) % 5 for i in range(SAMPLES)]  # made-up lengths: grouping reorders a window's samples only
MID_EPOCH, EPOCH_END = 6, 4  # global steps to stop at: epoch 0 has steps 1..4, epoch 1 has steps 5..8


class ElasticModule(SampleCountMixin, pl.LightningModule):
    """Exact item-mean loss over a ``GlobalBatchLoader`` of K x B per rank, on the Trainer's ranks."""

    def __init__(self, k: int, b: int, grouped: bool = False) -> None:
        super().__init__()
        self.net = make_net()
        self.k, self.b, self.grouped = k, b, grouped

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.sample_loss(*item_losses(self.net, (batch["x"], batch["y"], batch["valid"])))

    def train_dataloader(self) -> GlobalBatchLoader:
        trainer = self.trainer
        sampler = GlobalBatchSampler(
            SAMPLES,
            self.b,
            self.k,
            num_replicas=trainer.world_size,
            rank=trainer.global_rank,
            seed=SEED,
            lengths=LENGTHS if self.grouped else None,
        )
        return GlobalBatchLoader(dataset(), batch_sampler=sampler)

    def count_items(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["valid"].sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.net)


class SaveAtStep(pl.Callback):
    """``extra`` micro-batches after global step ``step``: save ``path`` and stop."""

    def __init__(self, path: Path, step: int, extra: int = 0) -> None:
        self.path, self.step, self.extra = path, step, extra
        self.since_step = 0  # micro-batches since the last optimizer step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stepped = trainer.fit_loop.epoch_loop.batch_progress.current.ready % trainer.accumulate_grad_batches == 0
        stepped = stepped or trainer.num_training_batches == batch_idx + 1
        self.since_step = 0 if stepped else self.since_step + 1
        if trainer.global_step == self.step and self.since_step == self.extra:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def trainer(
    ranks: int, k: int, callbacks: list[pl.Callback], mode: str = "deferred", strategy: str | None = None, **kwargs
) -> pl.Trainer:
    """A CPU Trainer of ``ranks`` processes (``fits.ranks_strategy`` unless ``strategy``), K = ``k``, the rescaler
    first."""
    default_strategy, release = ranks_strategy(ranks)
    return pl.Trainer(
        accelerator="cpu",
        devices=ranks,
        strategy=strategy or default_strategy,
        max_epochs=EPOCHS,
        accumulate_grad_batches=k,
        use_distributed_sampler=False,
        callbacks=[SampleCountRescaler(mode=mode), *callbacks, *release],
        **{**QUIET_TRAINER, **kwargs},
    )


def uninterrupted() -> tuple[Tensor, Tensor]:
    """Initial and final parameters of the plain-PyTorch run that never stops."""
    return final_parameters([WHOLE_EPOCH] * EPOCHS)
