"""Trajectory invariance on variable-length token data: the same parameters for every split of the batch.

Effective batch E = 8 samples per optimizer step, split as ranks x accumulation x micro-batch. With
``GlobalBatchSampler`` + ``SampleCountRescaler`` every split must end at the parameters of a plain-PyTorch
run that takes, per step, the mean token loss over the step's window of the seeded global permutation.
Naive Lightning (per-micro-batch mean loss, Lightning's own ``DistributedSampler``) must not.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from fits import QUIET_TRAINER, clean_env, ranks_strategy
from reference import MicroBatch, flat_parameters, relative_distance, train_reference
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_accum import GlobalBatchSampler, SampleCountMixin, SampleCountRescaler
from lightning_accum.demos.collate import PadCollate
from lightning_accum.demos.datasets import TokenSequenceDataset
from lightning_accum.demos.text import CharVocab, stdlib_docstring_lines

SAMPLES, MAX_CHARS, EPOCHS, SEED, LR = 25, 20, 3, 3, 0.5  # 25 = 3 full windows of 8 + 1 sample: tail padding
SPLITS = [(1, 1, 8), (1, 4, 2), (2, 2, 2), (2, 1, 4)]  # (ranks, accumulation K, micro-batch size)
EFFECTIVE = 8


def token_data() -> tuple[TokenSequenceDataset, int]:
    lines = stdlib_docstring_lines()[:SAMPLES]
    vocab = CharVocab(lines)
    return TokenSequenceDataset([vocab.encode(line, MAX_CHARS) for line in lines], vocab.pad_id), len(vocab)


class TokenNet(nn.Module):
    """Per-position next-token model: ``input_ids [B, T] -> logits [B, T, V]``."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab_size, 12)
        self.out = nn.Linear(12, vocab_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.out(torch.tanh(self.embed(input_ids)))


class TokenModule(pl.LightningModule):
    """Naive: returns the micro-batch's mean token loss; Lightning shards the data with its DistributedSampler."""

    def __init__(self, net: TokenNet, data: TokenSequenceDataset, micro_batch_size: int, accumulation: int) -> None:
        super().__init__()
        self.net = net
        self.data = data
        self.micro_batch_size = micro_batch_size
        self.accumulation = accumulation

    def item_losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits = self.net(batch["input_ids"])
        losses = F.cross_entropy(logits.transpose(1, 2), batch["targets"], reduction="none")
        return losses, batch["mask"] & batch["valid"][:, None]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        losses, mask = self.item_losses(batch)
        return losses[mask].mean()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.micro_batch_size, shuffle=True, collate_fn=PadCollate(0))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.net)


class ExactTokenModule(SampleCountMixin, TokenModule):
    """Exact: per-token losses through ``sample_loss``, one global permutation cut by ``GlobalBatchSampler``."""

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.sample_loss(*self.item_losses(batch))

    def train_dataloader(self) -> DataLoader:
        sampler = GlobalBatchSampler(len(self.data), self.micro_batch_size, self.accumulation, seed=SEED)
        return DataLoader(self.data, batch_sampler=sampler, collate_fn=PadCollate(0))


def make_optimizer(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)


def fit(split: tuple[int, int, int], exact: bool) -> Tensor:
    ranks, k, b = split
    data, vocab_size = token_data()
    pl.seed_everything(SEED, verbose=False)
    module = (ExactTokenModule if exact else TokenModule)(TokenNet(vocab_size), data, b, k)
    strategy, release = ranks_strategy(ranks)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=ranks,
        strategy=strategy,
        max_epochs=EPOCHS,
        accumulate_grad_batches=k,
        use_distributed_sampler=not exact,
        callbacks=[SampleCountRescaler(), *release] if exact else release,
        **QUIET_TRAINER,
    )
    trainer.fit(module)
    return flat_parameters(module.net)


def reference_run() -> tuple[Tensor, Tensor]:
    """Initial and final parameters of plain PyTorch: step s of epoch e uses window s of randperm(seed + e)."""
    data, vocab_size = token_data()
    collate = PadCollate(0)
    windows: list[list[MicroBatch]] = []
    for epoch in range(EPOCHS):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
        for start in range(0, len(order), EFFECTIVE):
            batch = collate([data[i] for i in order[start : start + EFFECTIVE]])
            windows.append([(batch["input_ids"], batch["targets"], batch["mask"])])
    net = TokenNet(vocab_size)
    return flat_parameters(net), train_reference(net, windows, make_optimizer).parameters


@pytest.fixture(scope="module")
def reference() -> tuple[Tensor, Tensor]:
    return reference_run()


def split_id(split: tuple[int, int, int]) -> str:
    return "x".join(map(str, split))


def invariance_job(split: tuple[int, int, int], exact: bool) -> str:
    """The name of a two-rank ``fit(split, exact)`` in ``rank_jobs.JOBS``."""
    return f"invariance-{'exact' if exact else 'naive'}-{split_id(split)}"


def split_params(exact: bool) -> list:
    """``SPLITS``, the two-rank ones fitted in ``rank_runs``' one launch."""
    marks = {split: [pytest.mark.two_ranks(invariance_job(split, exact))] if split[0] > 1 else [] for split in SPLITS}
    return [pytest.param(split, id=split_id(split), marks=marks[split]) for split in SPLITS]


def fitted(split: tuple[int, int, int], exact: bool, two_rank_runs) -> Tensor:
    """Final parameters of ``fit(split, exact)``: a two-rank split's from ``rank_runs``' launch."""
    return two_rank_runs[invariance_job(split, exact)]["parameters"] if split[0] > 1 else fit(split, exact)


@pytest.mark.slow
@pytest.mark.parametrize("split", split_params(exact=True))
def test_exact_runs_match_the_reference_for_every_split(split: tuple[int, int, int], reference, two_rank_runs) -> None:
    initial, final = reference
    distance = relative_distance(fitted(split, True, two_rank_runs), final, initial)
    assert distance < 1e-5, f"split {split}: exact run is {distance:.2e} of the update away from the reference"


@pytest.mark.slow
@pytest.mark.parametrize("split", split_params(exact=False))
def test_naive_runs_leave_the_reference(split: tuple[int, int, int], reference, two_rank_runs) -> None:
    initial, final = reference
    distance = relative_distance(fitted(split, False, two_rank_runs), final, initial)
    assert distance > 0.05, f"split {split}: naive run is only {distance:.3f} of the update away from the reference"


@pytest.mark.slow
def test_invariance_experiment_writes_plot_and_distance_table(tmp_path) -> None:
    """The real Hydra app: `-m experiment=invariance` on two splits, one epoch, in a subprocess."""
    root = Path(__file__).resolve().parents[1]
    command = [
        sys.executable,
        str(root / "scripts" / "train.py"),
        "-m",
        "experiment=invariance",
        "split=1x1x16,2x2x4",
        "trainer.max_epochs=1",
        f"paths.log_dir={tmp_path}",
    ]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300, env=clean_env())
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "invariance" / "multirun").iterdir()
    assert (sweep_dir / "invariance.png").stat().st_size > 10_000
    rows = [line.split("|")[1:-1] for line in (sweep_dir / "invariance.md").read_text().splitlines()[2:]]
    distances = {label.strip(): float(distance) for label, distance, _ in rows}
    assert set(distances) == {
        f"{mode} {split}" for mode in ("exact", "naive") for split in ("1 rank x K=1 x B=16", "2 ranks x K=2 x B=4")
    }
    assert distances["exact 1 rank x K=1 x B=16"] == 0.0
    assert distances["exact 2 ranks x K=2 x B=4"] < 1e-5
    assert distances["naive 1 rank x K=1 x B=16"] > 1e-2
    assert distances["naive 2 ranks x K=2 x B=4"] > 1e-3
