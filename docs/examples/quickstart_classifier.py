"""Quick start, classifier: one loss per sample, exact means over each optimizer step's samples."""

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_accum import SampleCountMixin, SampleCountRescaler


class Classifier(SampleCountMixin, L.LightningModule):  # the mixin first
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = F.cross_entropy(self.net(x), y, reduction="none")  # one loss per sample
        return {"loss": self.sample_loss(losses)}  # or the tensor itself

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


torch.manual_seed(0)
data = TensorDataset(torch.randn(100, 8), torch.randint(0, 3, (100,)))  # 100 samples
# Micro-batches of 16, 4 per step: an epoch is one step of 64 samples and one of 3 micro-batches
# (16 + 16 + 4 = 36 samples), where each sample weighs 1/36. train/loss logs each step's exact mean
# over its samples, train/items their number.
trainer = L.Trainer(
    max_epochs=2,
    accumulate_grad_batches=4,
    callbacks=[SampleCountRescaler()],
    logger=False,
    enable_checkpointing=False,  # writes nothing to the working folder
)
trainer.fit(Classifier(), DataLoader(data, batch_size=16, shuffle=True))
print({name: round(value.item(), 4) for name, value in trainer.callback_metrics.items()})
assert trainer.callback_metrics["train/items"] == 36  # the epoch's last step: 16 + 16 + 4
