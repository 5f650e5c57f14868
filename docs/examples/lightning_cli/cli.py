"""LightningCLI with exact accumulation: the callback comes from the config (config.yaml), not code.

    python docs/examples/lightning_cli/cli.py fit --config docs/examples/lightning_cli/config.yaml

Needs ``pip install "lightning-accum[cli]"`` (jsonargparse with signatures, for LightningCLI).
"""

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset

from lightning_accum import SampleCountMixin


class Regressor(SampleCountMixin, L.LightningModule):
    """A linear regression whose loss is the exact mean squared error over each step's samples."""

    def __init__(self, features: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.linear = torch.nn.Linear(features, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = F.mse_loss(self.linear(x).squeeze(-1), y, reduction="none")
        return self.sample_loss(losses)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class RandomRegression(L.LightningDataModule):
    """``samples`` points of a seeded linear function; 997 divides by no usual batch size."""

    def __init__(self, samples: int = 997, features: int = 8, batch_size: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(self.hparams.samples, self.hparams.features, generator=generator)
        y = x @ torch.randn(self.hparams.features, generator=generator)
        return DataLoader(TensorDataset(x, y), batch_size=self.hparams.batch_size, shuffle=True)


def main() -> None:
    """Run the CLI (``fit``, ``validate``, ...) on the regressor and its data."""
    LightningCLI(Regressor, RandomRegression)


if __name__ == "__main__":
    main()
