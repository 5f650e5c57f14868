"""Two ``strategy="ddp"`` fits on 2 CPU ranks: Lightning's injected ``DistributedSampler``, then ``GlobalBatchLoader``.

Usage: PYTHONWARNINGS=always python tests/distributed_sampler_fit.py -- rank 0 prints ``== plain`` and
``== global`` before each fit, so that the warnings between two markers belong to one fit.
"""

import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_accum import GlobalBatchLoader, GlobalBatchSampler, SampleCountMixin, SampleCountRescaler

DATA = TensorDataset(torch.randn(32, 3), torch.randn(32, 1))  # divides evenly: no repeated samples


class Regression(SampleCountMixin, pl.LightningModule):
    def __init__(self, window_loader: bool) -> None:
        super().__init__()
        self.window_loader = window_loader
        self.net = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.sample_loss(F.mse_loss(self.net(x), y, reduction="none"))

    def train_dataloader(self):
        if self.window_loader:
            return GlobalBatchLoader(DATA, GlobalBatchSampler(len(DATA), micro_batch_size=4, accumulate_grad_batches=2))
        return DataLoader(DATA, batch_size=4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    for window_loader in (False, True):
        trainer = pl.Trainer(
            strategy="ddp",
            accelerator="cpu",
            devices=2,
            max_epochs=1,
            accumulate_grad_batches=2,
            use_distributed_sampler=not window_loader,
            callbacks=[SampleCountRescaler()],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        if trainer.global_rank == 0:
            print("== global" if window_loader else "== plain", file=sys.stderr, flush=True)
        trainer.fit(Regression(window_loader))
