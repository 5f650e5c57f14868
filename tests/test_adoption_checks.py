"""What a project adopting the rescaler is told at train start: batch statistics, per-rank samplers."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from fits import clean_env
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from warned import fit_warnings

from lightning_accum import GlobalBatchLoader, GlobalBatchSampler, SampleCountMixin
from lightning_accum.data.checks import warn_about_distributed_sampler

DATA = TensorDataset(torch.randn(12, 4), torch.randn(12, 1))
BATCH_NORM = "batch-normalization layers in training mode"
PER_RANK = "deals its samples out to the 2 ranks"


class Net(SampleCountMixin, pl.LightningModule):
    """lightning-hydra-template's default net in small: Linear, BatchNorm1d, ReLU, Linear."""

    def __init__(self, freeze_statistics: bool = False) -> None:
        super().__init__()
        self.freeze_statistics = freeze_statistics
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
        )

    def on_train_start(self) -> None:
        if self.freeze_statistics:
            self.net[1].eval()  # normalize with the running statistics: each item's loss is its own

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.sample_loss(F.mse_loss(self.net(x), y, reduction="none"))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def messages(caught: list[warnings.WarningMessage], part: str) -> list[str]:
    return [str(w.message) for w in caught if part in str(w.message)]


def fit_messages(module: pl.LightningModule) -> list[str]:
    return fit_warnings(module, DataLoader(DATA, batch_size=3), BATCH_NORM)


def test_batch_norm_in_training_mode_warns_once_naming_the_layer() -> None:
    found = fit_messages(Net())
    assert len(found) == 1, found
    assert found[0].startswith("Net has batch-normalization layers in training mode (net.1 (BatchNorm1d))"), found
    assert "LayerNorm, GroupNorm" in found[0]


def test_batch_norm_with_frozen_statistics_is_not_reported() -> None:
    assert fit_messages(Net(freeze_statistics=True)) == []


def window_loader(num_replicas: int) -> GlobalBatchLoader:
    return GlobalBatchLoader(
        DATA, GlobalBatchSampler(12, 3, accumulate_grad_batches=2, num_replicas=num_replicas, rank=0)
    )


@pytest.mark.parametrize(
    ("loader", "world_size", "warns"),
    [
        (DataLoader(DATA, sampler=DistributedSampler(DATA, num_replicas=2, rank=0), batch_size=3), 2, True),
        (DataLoader(DATA, batch_size=3), 2, True),  # use_distributed_sampler=False with a plain loader
        ([window_loader(2)], 2, False),
        (DataLoader(DATA, batch_size=3), 1, False),
        # 13 samples on 2 ranks: the repeated-samples warning names the same fix, this one stays silent.
        (DataLoader(list(range(13)), sampler=DistributedSampler(range(13), num_replicas=2, rank=0)), 2, False),
    ],
    ids=["distributed-sampler", "plain-sampler", "global-batch-loader", "one-process", "repeats"],
)
def test_loaders_that_deal_samples_per_rank_warn(loader, world_size: int, warns: bool) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_about_distributed_sampler(loader, world_size)
    found = messages(caught, PER_RANK)
    assert len(found) == int(warns), found
    if warns:
        assert "GlobalBatchLoader(dataset, GlobalBatchSampler(" in found[0]
        assert "Trainer(use_distributed_sampler=False)" in found[0]


@pytest.mark.slow
def test_ddp_fit_with_the_injected_sampler_warns_once_on_rank_zero(tmp_path: Path) -> None:
    script = Path(__file__).with_name("distributed_sampler_fit.py")
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**clean_env(), "PYTHONWARNINGS": "always"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    plain, _, global_batch = done.stderr.partition("== global")
    assert "== plain" in plain, done.stderr
    assert plain.count(PER_RANK) == 1, plain  # rank 0 only, once
    assert PER_RANK not in global_batch, global_batch
