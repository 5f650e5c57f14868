"""A key the rescaler logs that the module logs too (as lightning-hydra-template's ``train/loss``) warns once."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from warned import fit_warnings

from lightning_accum import SampleCountMixin


class LogsItsOwn(SampleCountMixin, pl.LightningModule):
    """Logs ``key`` from ``hook`` with ``on_step``/``on_epoch``, as a project's own module does."""

    def __init__(self, key: str, hook: str = "training_step", on_step: bool = False) -> None:
        super().__init__()
        self.key, self.hook, self.on_step = key, hook, on_step
        self.net = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = F.mse_loss(self.net(x), y, reduction="none")
        if self.hook == "training_step":
            self.log(self.key, losses.mean(), on_step=self.on_step, on_epoch=True)
        return self.sample_loss(losses)

    def on_train_epoch_end(self) -> None:
        if self.hook == "on_train_epoch_end":
            self.log(self.key, 1.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def collision_warnings(module: pl.LightningModule, max_epochs: int = 1, **rescaler: str) -> list[str]:
    """The messages of the collision warnings a short fit of ``module`` raised."""
    data = TensorDataset(torch.randn(12, 3), torch.randn(12, 1))
    return fit_warnings(module, DataLoader(data, batch_size=3), "logs the same key", max_epochs, **rescaler)


def test_module_logging_the_step_loss_key_warns_once_with_the_fix() -> None:
    messages = collision_warnings(LogsItsOwn("train/loss"), max_epochs=2)
    assert len(messages) == 1, messages
    assert "SampleCountRescaler logs 'train/loss' (the item-mean loss of each optimizer step)" in messages[0]
    assert "self.log in training_step" in messages[0]
    assert "SampleCountRescaler(loss_name='train/loss_exact')" in messages[0]


def test_a_forked_key_colliding_with_the_epoch_loss_is_found() -> None:
    """``self.log("train/loss", on_step=True, on_epoch=True)`` logs ``train/loss_epoch``: the rescaler's epoch key."""
    messages = collision_warnings(LogsItsOwn("train/loss", on_step=True))
    assert any("'train/loss_epoch' (the item-weighted mean loss of the epoch)" in m for m in messages), messages
    assert any("'train/loss' (the item-mean loss" in m for m in messages), messages


def test_a_key_logged_at_the_epoch_end_is_found_at_the_next_step() -> None:
    messages = collision_warnings(LogsItsOwn("train/items", hook="on_train_epoch_end"), max_epochs=2)
    assert len(messages) == 1 and "self.log in on_train_epoch_end" in messages[0], messages


RENAMED = {"loss_name": "train/loss_exact"}


@pytest.mark.parametrize(("key", "rescaler"), [("train/acc", {}), ("train/loss", RENAMED)], ids=["other", "renamed"])
def test_distinct_keys_do_not_warn(key: str, rescaler: dict[str, str]) -> None:
    assert collision_warnings(LogsItsOwn(key), max_epochs=2, **rescaler) == []
