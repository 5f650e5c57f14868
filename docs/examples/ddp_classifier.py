"""DDP with the same samples per step as one process: GlobalBatchLoader, built in train_dataloader.

Runs 2 CPU processes (gloo); ``python docs/examples/ddp_classifier.py``.
``use_distributed_sampler=False`` keeps Lightning from injecting its ``DistributedSampler``, which
would shuffle and repeat samples.
"""

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lightning_accum import (
    GlobalBatchLoader,
    GlobalBatchSampler,
    SampleCountMixin,
    SampleCountRescaler,
)


class Samples(Dataset):
    """100 seeded samples; index -1 (a padding slot of the sampler): a placeholder, valid=False."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x, self.y = (
            torch.randn(100, 8, generator=generator),
            torch.randint(0, 3, (100,), generator=generator),
        )

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict:
        valid = index != -1
        return {
            "x": self.x[index] * valid,
            "y": self.y[index] * valid,
            "valid": torch.tensor(valid),
        }


class Classifier(SampleCountMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)
        )

    def training_step(self, batch, batch_idx):
        losses = F.cross_entropy(self.net(batch["x"]), batch["y"], reduction="none")
        return self.sample_loss(losses, mask=batch["valid"])  # padding slots count for nothing

    def train_dataloader(
        self,
    ):  # the ranks are known here: the sampler reads them from torch.distributed
        sampler = GlobalBatchSampler(100, micro_batch_size=8, accumulate_grad_batches=2, seed=0)
        return GlobalBatchLoader(Samples(), sampler)

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
    # 100 samples in windows of 2 ranks x 2 x 8 = 32: 3 full steps and one of 4, each sample once.
    print({name: round(value.item(), 4) for name, value in trainer.callback_metrics.items()})
