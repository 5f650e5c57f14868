"""A classifier written as lightning-hydra-template's MNISTLitModule, with one loss per sample."""

import lightning.pytorch as L
import torch
from torchmetrics import MeanMetric

from lightning_accum import SampleCountMixin
from project.data import IGNORE


class Classifier(SampleCountMixin, L.LightningModule):  # lightning-accum: the mixin first
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
        )
        # lightning-accum: one loss per sample (reduction="none"), not the micro-batch mean
        self.criterion = torch.nn.CrossEntropyLoss(reduction="none", ignore_index=IGNORE)
        self.train_loss = MeanMetric()

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = self.criterion(self.net(x), y)
        labelled = y != IGNORE
        # The project's own epoch metric, as in the template: the mean of the micro-batch means.
        self.train_loss(losses[labelled].mean().detach())
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        # lightning-accum: each optimizer step's exact mean over the labelled samples of its window
        return self.sample_loss(losses, mask=labelled)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
