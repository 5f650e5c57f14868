"""Padding micro-batches count nothing, whatever the dataset does with indices: ``GlobalBatchLoader`` marks them.

25 samples, effective batch 8: each epoch ends with a window of 1 sample. On 2 ranks (K=2, B=2) rank 1's
last micro-batch is padding; ``GlobalBatchLoader`` fetches a real sample for it and the rescaler counts it as
0 items. A dataset that indexes plainly (``dataset[-1]`` is its last sample) and one that still turns the
padding index into a ``valid=False`` placeholder must both give the plain-PyTorch reference: each step the
item mean over its window of ``randperm(SEED + epoch)``.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from cases import CLASSES, FEATURES, make_net
from fits import QUIET_TRAINER, in_launched_rank, ranks_strategy
from lightning.pytorch.strategies import DDPStrategy
from reference import flat_parameters, relative_distance, train_reference
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_accum import GlobalBatchLoader, GlobalBatchSampler, SampleCountMixin, SampleCountRescaler
from lightning_accum.data.checks import warn_about_padding_index
from lightning_accum.demos.datasets import FeatureDataset
from lightning_accum.engines import DeferredEngine, LookaheadEngine
from lightning_accum.run import Run

SAMPLES, EFFECTIVE, EPOCHS, SEED, LR = 25, 8, 2, 5, 0.3
SPLITS = {1: (2, 4), 2: (2, 2)}  # ranks -> (K, micro-batch size); E = ranks * K * B = 8


def features() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(SAMPLES, FEATURES, generator=gen), torch.randint(0, CLASSES, (SAMPLES,), generator=gen)


class PlainDataset(Dataset):
    """``(x, y)`` pairs, indexed plainly: index -1 is the last sample, as for a list or a ``TensorDataset``."""

    def __init__(self) -> None:
        self.x, self.y = features()

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.x[index], self.y[index]


class PaddingModule(SampleCountMixin, pl.LightningModule):
    """Cross-entropy per sample; ``legacy`` reads a ``FeatureDataset`` (index -1 a ``valid=False`` placeholder)."""

    def __init__(self, split: tuple[int, int], legacy: bool) -> None:
        super().__init__()
        self.net = make_net()
        self.split_kb, self.legacy = split, legacy

    def split(self, batch) -> tuple[Tensor, Tensor, Tensor | None]:
        if self.legacy:
            return batch["x"], batch["y"], batch["valid"]
        return *batch, None

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y, mask = self.split(batch)
        return self.sample_loss(nn.functional.cross_entropy(self.net(x), y, reduction="none"), mask)

    def count_items(self, batch) -> Tensor:
        _, y, mask = self.split(batch)
        return torch.tensor(len(y)) if mask is None else mask.sum()

    def train_dataloader(self) -> GlobalBatchLoader:
        k, b = self.split_kb
        dataset = FeatureDataset(*features()) if self.legacy else PlainDataset()
        return GlobalBatchLoader(dataset, GlobalBatchSampler(SAMPLES, b, k, seed=SEED))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)


class ManualPaddingModule(PaddingModule):
    """The same in its own loop: ``sample_backward`` per micro-batch, a step every K and at the epoch's end."""

    def __init__(self, split: tuple[int, int], legacy: bool) -> None:
        super().__init__(split, legacy)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx: int) -> None:
        x, y, mask = self.split(batch)
        self.sample_backward(nn.functional.cross_entropy(self.net(x), y, reduction="none"), mask)
        if (batch_idx + 1) % self.split_kb[0] == 0 or self.trainer.is_last_batch:
            optimizer = self.optimizers()
            optimizer.step()
            optimizer.zero_grad()


def fit(
    ranks: int,
    mode: str,
    legacy: bool,
    split: tuple[int, int] | None = None,
    strategy: Any = None,
    manual: bool = False,
) -> Tensor:
    """Final parameters of a fit on ``ranks`` CPU processes (``fits.ranks_strategy``) with ``split`` = (K, B);
    ``manual``: the module's own loop accumulates K micro-batches (the Trainer's K is then 1)."""
    split = split or SPLITS[ranks]
    model = (ManualPaddingModule if manual else PaddingModule)(split, legacy)
    default_strategy, release = ranks_strategy(ranks)
    pl.Trainer(
        accelerator="cpu",
        devices=ranks,
        strategy=strategy or default_strategy,
        max_epochs=EPOCHS,
        accumulate_grad_batches=1 if manual else split[0],
        use_distributed_sampler=False,
        callbacks=[SampleCountRescaler(mode=mode), *release],
        **QUIET_TRAINER,
    ).fit(model)
    return flat_parameters(model.net)


def reference_for(effective: int) -> tuple[Tensor, Tensor]:
    """Initial and final parameters of plain PyTorch: one step per window of ``effective`` samples, each once."""
    x, y = features()
    windows = []
    for epoch in range(EPOCHS):
        order = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(SEED + epoch))
        starts = range(0, SAMPLES, effective)
        windows += [[(x[order[s : s + effective]], y[order[s : s + effective]], None)] for s in starts]
    optimizer = lambda net: torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)  # noqa: E731
    return flat_parameters(make_net()), train_reference(make_net(), windows, optimizer).parameters


@pytest.fixture(scope="module")
def reference() -> tuple[Tensor, Tensor]:
    return reference_for(EFFECTIVE)


def test_one_process_plain_dataset_is_exact(reference, measured) -> None:
    initial, final = reference
    for mode in ("deferred", "lookahead"):
        assert measured(relative_distance(fit(1, mode, legacy=False), final, initial), mode) < 1e-5


def static_graph() -> DDPStrategy:
    """DDP with ``static_graph=True``: spawned from the test process, or in a rank that ``rank_runs`` started."""
    return DDPStrategy(static_graph=True, **({} if in_launched_rank() else {"start_method": "spawn"}))


def padding_job(mode: str, legacy: bool) -> str:
    """The name of the two-rank fit of ``test_two_ranks_padding_counts_nothing`` in ``rank_jobs.JOBS``."""
    return f"padding-{mode}-{'legacy' if legacy else 'plain'}"


PADDING_JOBS = [padding_job(mode, legacy) for mode in ("deferred", "lookahead") for legacy in (False, True)]


@pytest.mark.slow
@pytest.mark.two_ranks(*PADDING_JOBS)
@pytest.mark.parametrize("mode", ["deferred", "lookahead"])
@pytest.mark.parametrize("legacy", [False, True], ids=["plain-dataset", "dataset-handling-minus-1"])
def test_two_ranks_padding_counts_nothing(reference, measured, two_rank_runs, mode: str, legacy: bool) -> None:
    initial, final = reference
    parameters = two_rank_runs[padding_job(mode, legacy)]["parameters"]  # fit(2, mode, legacy)
    assert measured(relative_distance(parameters, final, initial)) < 1e-5


@pytest.mark.slow
@pytest.mark.two_ranks("padding-read_ahead")
def test_two_ranks_padding_read_ahead_inside_a_window(measured, two_rank_runs) -> None:
    # K=11, B=1: windows of 22 samples; the last holds 3, cut into 4 micro-batches, so rank 1's second one is padding.
    # Look-ahead counts it at the window's start, read ahead before the loop delivers it: it must count 0 there too.
    initial, final = reference_for(22)
    parameters = two_rank_runs["padding-read_ahead"]["parameters"]  # fit(2, "lookahead", legacy=False, split=(11, 1))
    assert measured(relative_distance(parameters, final, initial)) < 1e-5


@pytest.mark.slow
def test_static_graph_with_accumulation_is_refused_at_setup_on_two_ranks() -> None:
    # Without the check, PyTorch's reducer stops at the first window's last backward with "expect_autograd_hooks_
    # INTERNAL ASSERT FAILED" (plain Lightning does the same); the refusal names static_graph=False.
    with pytest.raises(Exception, match=r"static_graph=True\) cannot accumulate gradients \(K=2\).*static_graph=False"):
        fit(2, "deferred", legacy=False, strategy=static_graph())


@pytest.mark.slow
@pytest.mark.two_ranks("padding-static_graph")
def test_static_graph_without_accumulation_is_exact_on_two_ranks(reference, measured, two_rank_runs) -> None:
    initial, final = reference
    parameters = two_rank_runs["padding-static_graph"]["parameters"]  # fit(2, "deferred", split=(1, 4), static)
    assert measured(relative_distance(parameters, final, initial)) < 1e-5


@pytest.mark.slow
@pytest.mark.two_ranks("padding-static_graph-manual")
def test_static_graph_with_accumulation_in_the_modules_own_loop_is_exact(reference, measured, two_rank_runs) -> None:
    # Manual optimization syncs every backward (no no_sync), which a static graph allows: K=2 in the module's loop,
    # the epoch's last window of 1 sample with a padding micro-batch on rank 1.
    initial, final = reference
    parameters = two_rank_runs["padding-static_graph-manual"]["parameters"]  # fit(2, ..., static, manual=True)
    assert measured(relative_distance(parameters, final, initial)) < 1e-5


# ---------------------------------------------------------------------------------------------- the parts


def test_loader_fetches_a_real_sample_for_padding_and_marks_its_position() -> None:
    # 5 samples on 2 ranks, B=2: rank 1's second micro-batch is padding. A list indexes -1 as its last item.
    data = [10, 11, 12, 13, 14]
    sampler = GlobalBatchSampler(5, 2, num_replicas=2, rank=1, shuffle=False)
    assert list(sampler) == [[2, 3], [-1]]
    loader = GlobalBatchLoader(data, sampler)
    assert [batch.tolist() for batch in loader] == [[12, 13], [10]]
    assert [loader.is_padding(p) for p in range(2)] == [False, True]
    grouped = GlobalBatchSampler(5, 2, num_replicas=2, rank=1, shuffle=False, lengths=[9, 8, 1, 7, 6])
    assert GlobalBatchLoader(data, grouped).padding_substitute == 2  # the shortest sample


def test_loader_marks_padding_after_a_resume_at_its_epoch_position() -> None:
    sampler = GlobalBatchSampler(5, 2, num_replicas=2, rank=1, shuffle=False)
    loader = GlobalBatchLoader(list(range(5)), sampler)
    loader.load_state_dict({**sampler.layout(), "epoch": 0, "micro_batches": 1})
    assert [batch.tolist() for batch in loader] == [[0]]
    assert not loader.is_padding(0) and loader.is_padding(1)


def test_loader_refuses_padding_inside_a_micro_batch_and_out_of_order_delivery() -> None:
    class Mixed(GlobalBatchSampler):
        def __iter__(self):
            yield [0, -1]

    with pytest.raises(RuntimeError, match=r"padding index inside micro-batch 0 \(\[0, -1\]\).*whole micro-batch"):
        list(GlobalBatchLoader(list(range(5)), Mixed(5, 2)))
    with pytest.raises(ValueError, match="drop in_order=False"):
        GlobalBatchLoader(list(range(5)), GlobalBatchSampler(5, 2), num_workers=1, in_order=False)


@pytest.mark.parametrize("engine_type", [DeferredEngine, LookaheadEngine])
def test_engine_counts_a_padding_micro_batch_as_nothing(engine_type) -> None:
    # One rank, K=2: micro-batch 1 is padding and holds a real sample (loss 100), which must count 0 items. The
    # reference: the gradient of the mean over the first micro-batch's 2 items, computed by hand.
    w = torch.ones(2, requires_grad=True)
    batches = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[50.0, 50.0]])]
    run = Run.single_process(accumulate_grad_batches=2)
    run.count_items = len  # counts the padding micro-batch's sample: the engine must not
    engine = engine_type()
    engine.begin_fit(run)
    for batch_idx, x in enumerate(batches):
        engine.start_micro_batch(batch_idx, x, lambda n, i=batch_idx: batches[i + 1 :][:n], lambda p: p == 1)
        losses = x @ w
        (engine.micro_batch_loss(losses.sum(), torch.tensor(float(len(x)), dtype=torch.float64)) / 2).backward()
    finished = engine.finish_window([w], ends_epoch=False, epoch_batches=2)
    assert float(finished.totals.items) == 2.0
    assert torch.equal(w.grad, torch.tensor([2.0, 3.0]))  # mean of [1, 2] and [3, 4]


def test_mask_on_another_device_names_the_fix() -> None:
    losses = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"mask is on meta but losses are on cpu.*mask.to\(losses.device\)"):
        PaddingModule((1, 1), legacy=False).sample_loss(losses, torch.ones(3, dtype=torch.bool, device="meta"))


def test_a_plain_dataloader_over_a_padding_sampler_warns_with_the_fix() -> None:
    pads = GlobalBatchSampler(5, 2, num_replicas=2, rank=0)
    with pytest.warns(UserWarning, match=r"padding index -1 to the dataset.*Use GlobalBatchLoader\(dataset"):
        warn_about_padding_index(DataLoader(list(range(5)), batch_sampler=pads))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_about_padding_index(GlobalBatchLoader(list(range(5)), pads))
        warn_about_padding_index(DataLoader(list(range(5)), batch_sampler=GlobalBatchSampler(5, 2)))  # never pads
