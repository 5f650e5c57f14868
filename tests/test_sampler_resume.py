"""Mid-epoch resume through Lightning: ``GlobalBatchLoader`` continues exactly; a plain ``DataLoader`` replays.

A run saves a checkpoint two optimizer steps into epoch 1 (or after the last batch of epoch 0) and stops;
a new Trainer resumes from it. The final parameters must equal a plain-PyTorch run that never stopped:
step ``s`` of epoch ``e`` takes the item mean over window ``s`` of ``randperm(SEED + e)``, cut into
windows of ``E = 8`` samples.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from cases import CLASSES, FEATURES, make_net
from fits import QUIET_TRAINER, ranks_strategy
from reference import MicroBatch, flat_parameters, item_losses, relative_distance, train_reference
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_accum import GlobalBatchLoader, GlobalBatchSampler, SampleCountMixin, SampleCountRescaler
from lightning_accum.demos.datasets import FeatureDataset

SAMPLES, EFFECTIVE, EPOCHS, SEED, LR = 25, 8, 3, 5, 0.3  # 3 full windows + 1 sample per epoch: tail padding
MID_EPOCH, EPOCH_END = 6, 4  # global steps to stop at: epoch 0 has steps 1..4, epoch 1 has steps 5..8
SPLITS = {1: (2, 4), 2: (2, 2)}  # ranks -> (accumulation K, micro-batch size), E = ranks * K * B = 8


def dataset() -> FeatureDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, FEATURES, generator=gen)
    return FeatureDataset(x, torch.randint(0, CLASSES, (SAMPLES,), generator=gen))


def make_optimizer(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)


class CountingSampler(GlobalBatchSampler):
    """Counts the micro-batches it yielded in the current epoch: how far DataLoader workers pull ahead."""

    yielded = 0

    def __iter__(self):
        self.yielded = self.start
        for batch in super().__iter__():
            self.yielded += 1
            yield batch


class ResumableModule(SampleCountMixin, pl.LightningModule):
    """Exact item-mean loss over a ``GlobalBatchLoader`` (or, with ``stateful=False``, a plain ``DataLoader``)."""

    def __init__(self, ranks: int, num_workers: int, stateful: bool = True) -> None:
        super().__init__()
        self.net = make_net()
        self.ranks, self.num_workers, self.stateful = ranks, num_workers, stateful

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.sample_loss(*item_losses(self.net, (batch["x"], batch["y"], batch["valid"])))

    def train_dataloader(self) -> DataLoader:
        k, b = SPLITS[self.ranks]
        sampler = CountingSampler(SAMPLES, b, k, seed=SEED)
        loader = GlobalBatchLoader if self.stateful else DataLoader
        # Workers must not be forked from a process whose gloo group is alive (its threads can leave a
        # lock held in the child, which then hangs): forkserver forks them from a clean server process that
        # has torch preloaded, so they start in well under a second (spawn would import torch in each).
        context = None
        if self.num_workers:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["torch", "lightning_accum"])
        return loader(dataset(), batch_sampler=sampler, num_workers=self.num_workers, multiprocessing_context=context)

    def count_items(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["valid"].sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.net)


class SaveAndStop(pl.Callback):
    """At global step ``stop_step``: save ``path`` and stop. Before, check and record the loader's position.

    The loader's position equals the batches trained after every batch, or with ``every_batch=False`` (look-ahead
    mode, which reads a window's batches at its start) after the last batch of each window.
    """

    def __init__(self, path: Path, stop_step: int, every_batch: bool = True) -> None:
        self.path = path
        self.stop_step = stop_step
        self.every_batch = every_batch
        self.steps_seen = 0
        self.positions: list[tuple[int, int, int]] = []  # (batch_idx, loader position, micro-batches yielded)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loader = trainer.train_dataloader
        stepped, self.steps_seen = trainer.global_step > self.steps_seen, trainer.global_step
        if isinstance(loader, GlobalBatchLoader) and (self.every_batch or stepped):
            state = loader.state_dict()
            assert (state["epoch"], state["micro_batches"]) == (trainer.current_epoch, batch_idx + 1)
            self.positions.append((batch_idx, state["micro_batches"], loader.batch_sampler.yielded))
        if trainer.global_step == self.stop_step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


class SaveInsideWindowAndStop(pl.Callback):
    """After batch ``batch_idx`` of epoch 1 (inside a window of K=2): save ``path``, and a copy one batch earlier (a
    step boundary) to ``boundary``, then stop."""

    def __init__(self, path: Path, boundary: Path, batch_idx: int = 2) -> None:
        self.path, self.boundary, self.batch_idx = path, boundary, batch_idx

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.current_epoch == 1 and batch_idx == self.batch_idx - 1:
            trainer.save_checkpoint(self.boundary)
        if trainer.current_epoch == 1 and batch_idx == self.batch_idx:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def trainer(ranks: int, callbacks: list[pl.Callback], mode: str = "deferred") -> pl.Trainer:
    strategy, release = ranks_strategy(ranks)
    return pl.Trainer(
        accelerator="cpu",
        devices=ranks,
        strategy=strategy,
        max_epochs=EPOCHS,
        accumulate_grad_batches=SPLITS[ranks][0],
        use_distributed_sampler=False,
        callbacks=[SampleCountRescaler(mode=mode), *callbacks, *release],
        **QUIET_TRAINER,
    )


def fit_with_resume(
    tmp_path: Path,
    ranks: int,
    num_workers: int,
    stop_step: int = MID_EPOCH,
    stateful: bool = True,
    mode: str = "deferred",
) -> tuple[Tensor, SaveAndStop]:
    """Fit until ``stop_step``, then fit a new module with a new Trainer from the checkpoint; final parameters."""
    stop = SaveAndStop(tmp_path / "resume.ckpt", stop_step, every_batch=mode == "deferred")
    trainer(ranks, [stop], mode).fit(ResumableModule(ranks, num_workers, stateful))
    resumed = ResumableModule(ranks, num_workers, stateful)
    trainer(ranks, [], mode).fit(resumed, ckpt_path=stop.path)
    return flat_parameters(resumed.net), stop


def windows(orders: list[list[int]], cuts: list[list[tuple[int, int]]]) -> list[list[MicroBatch]]:
    """One reference window per ``(start, end)`` slice of its epoch's order, every sample counted."""
    data = dataset()
    return [
        [(data.x[order[a:b]], data.y[order[a:b]], None)]
        for order, epoch in zip(orders, cuts, strict=True)
        for a, b in epoch
    ]


def epoch_orders() -> list[list[int]]:
    return [torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(SEED + e)).tolist() for e in range(EPOCHS)]


def final_parameters(cuts: list[list[tuple[int, int]]]) -> tuple[Tensor, Tensor]:
    """Initial and final parameters of plain PyTorch over these windows."""
    run = train_reference(make_net(), windows(epoch_orders(), cuts), make_optimizer)
    return flat_parameters(make_net()), run.parameters


WHOLE_EPOCH = [(s, min(s + EFFECTIVE, SAMPLES)) for s in range(0, SAMPLES, EFFECTIVE)]


@pytest.fixture(scope="module")
def uninterrupted() -> tuple[Tensor, Tensor]:
    return final_parameters([WHOLE_EPOCH] * EPOCHS)


def on_two_ranks(job: str, *values: object, id: str) -> pytest.ParameterSet:
    """A case whose fits run in ``rank_runs``' one launch of two ranks (job ``job`` of ``rank_jobs.JOBS``)."""
    return pytest.param(*values, id=id, marks=pytest.mark.two_ranks(job))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ranks", "num_workers", "stop_step"),
    [
        pytest.param(1, 0, MID_EPOCH, id="1rank-0workers"),
        pytest.param(1, 2, MID_EPOCH, id="1rank-2workers"),
        on_two_ranks("resume-0workers", 2, 0, MID_EPOCH, id="2ranks-0workers"),
        on_two_ranks("resume-2workers", 2, 2, MID_EPOCH, id="2ranks-2workers"),
        pytest.param(1, 2, EPOCH_END, id="1rank-2workers-epoch_end"),
    ],
)
def test_global_batch_loader_resumes_exactly(
    tmp_path, uninterrupted, measured, two_rank_runs, ranks, num_workers, stop_step
) -> None:
    if ranks == 2:  # both ranks check the loader's position in SaveAndStop; a failed check fails the launch
        parameters = two_rank_runs[f"resume-{num_workers}workers"]["parameters"]
    else:
        parameters, stop = fit_with_resume(tmp_path, ranks, num_workers, stop_step)
    initial, final = uninterrupted
    distance = relative_distance(parameters, final, initial)
    assert measured(distance) < 1e-5, f"resumed run is {distance:.2e} of the update away from the reference"
    if ranks == 1:  # under ddp_spawn the records stay in the spawned processes (which check the position)
        ahead = max(sampler - loader for _, loader, sampler in stop.positions)
        assert ahead == (4 if num_workers else 0)  # workers pull prefetch_factor (2) * num_workers indices ahead


@pytest.mark.slow
def test_lookahead_mode_resumes_exactly(tmp_path, uninterrupted, measured) -> None:
    # Look-ahead reads each window's batches at its start; a checkpoint at the window's end still saves the
    # position of the batches trained, so the resumed window starts at the next unseen micro-batch.
    parameters, stop = fit_with_resume(tmp_path, ranks=1, num_workers=2, mode="lookahead")
    initial, final = uninterrupted
    assert measured(relative_distance(parameters, final, initial)) < 1e-5
    assert len(stop.positions) == MID_EPOCH


@pytest.mark.slow
def test_plain_dataloader_resume_replays_the_start_of_the_epoch(tmp_path, uninterrupted, measured) -> None:
    """Lightning skips nothing for a loader without state: epoch 1 restarts and stops at its batch count.

    Single process, K=2, B=4: 7 micro-batches per epoch (3 windows of 2 x 4, then 1 sample). The checkpoint
    follows micro-batch 4 of epoch 1; the resumed Trainer runs batch_idx 4..6 on micro-batches 0..2 again.
    """
    with pytest.warns(
        UserWarning, match=r"resumes inside an epoch, but its train DataLoader cannot.*GlobalBatchLoader"
    ):
        parameters, _ = fit_with_resume(tmp_path, ranks=1, num_workers=0, stateful=False)
    initial, final = uninterrupted
    replayed = [(0, 8), (8, 16), (0, 8), (8, 12)]  # trained, trained, replayed window 0, half of window 1
    replay_initial, replay_final = final_parameters([WHOLE_EPOCH, replayed, WHOLE_EPOCH])
    assert relative_distance(parameters, replay_final, replay_initial) < 1e-5
    assert measured(relative_distance(parameters, final, initial)) > 1e-2


def fit_inside_window(folder: Path, ranks: int) -> tuple[Tensor, SaveInsideWindowAndStop]:
    """Fit until batch 2 of epoch 1 (inside a window), saving a checkpoint there and one a batch earlier under
    ``folder``, then fit a new module with a new Trainer from the first; final parameters."""
    stop = SaveInsideWindowAndStop(folder / "inside.ckpt", folder / "boundary.ckpt")
    trainer(ranks, [stop]).fit(ResumableModule(ranks, num_workers=0))
    resumed = ResumableModule(ranks, num_workers=0)
    trainer(ranks, []).fit(resumed, ckpt_path=stop.path)
    return flat_parameters(resumed.net), stop


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, on_two_ranks("resume-inside_window", 2, id="2")])
def test_checkpoint_inside_a_window_resumes_exactly(tmp_path, uninterrupted, measured, two_rank_runs, ranks) -> None:
    # K=2: batch 2 of epoch 1 is the first micro-batch of a window. Lightning keeps no accumulated gradient; the
    # rescaler's state carries every rank's partial gradient and counts, and only in a checkpoint inside a window.
    if ranks == 2:
        parameters = two_rank_runs["resume-inside_window"]["parameters"]
        folder = two_rank_runs.folder_of("resume-inside_window")
    else:
        parameters, _ = fit_inside_window(tmp_path, ranks)
        folder = tmp_path
    initial, final = uninterrupted
    assert measured(relative_distance(parameters, final, initial)) < 1e-5
    gradient_bytes = ranks * sum(p.numel() for p in make_net().parameters()) * 4  # float32, every rank's
    extra = (folder / "inside.ckpt").stat().st_size - (folder / "boundary.ckpt").stat().st_size
    assert gradient_bytes <= measured(extra, "extra checkpoint bytes") < gradient_bytes + 4096


def test_global_batch_loader_refuses_other_samplers() -> None:
    # Another split of the same effective batch resumes (tests/test_elastic_resume.py).
    with pytest.raises(TypeError, match="needs a GlobalBatchSampler, got BatchSampler"):
        GlobalBatchLoader(dataset(), DataLoader(dataset(), batch_size=2).batch_sampler)
