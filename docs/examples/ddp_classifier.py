"""DDP with the same samples per step as one process: GlobalBatchLoader, built in train_dataloader.

Runs 2 CPU processes (gloo); ``python docs/examples/ddp_classifier.py``.
``use_distributed_sampler=False`` keeps Lightning from injecting its ``DistributedSampler``, which
would shuffle and repeat samples.
"""

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from lightning_accum import (
    GlobalBatchLoader,
    GlobalBatchSampler,
    SampleCountMixin,
    SampleCountRescaler,
)


def samples() -> TensorDataset:
    """97 seeded samples, a plain dataset: GlobalBatchLoader pads a rank that runs short."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(97, 8, generator=generator)
    y = torch.randint(0, 3, (97,), generator=generator)
    return TensorDataset(x, y)


class Classifier(SampleCountMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.sample_loss(F.cross_entropy(self.net(x), y, reduction="none"))

    def train_dataloader(self):  # the ranks are known here (the sampler reads torch.distributed)
        sampler = GlobalBatchSampler(97, micro_batch_size=8, accumulate_grad_batches=2, seed=0)
        return GlobalBatchLoader(samples(), sampler)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    torch.manual_seed(0)
    trainer = L.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        accumulate_grad_batches=2,
        use_distributed_sampler=False,
        callbacks=[SampleCountRescaler()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(Classifier())
    # 97 samples in windows of 2 ranks x 2 x 8 = 32: 3 full steps and one of 1 sample, each sample
    # once (rank 1 runs a padding micro-batch there, which counts nothing: train/items is 1).
    print({name: round(value.item(), 4) for name, value in trainer.callback_metrics.items()})
