"""GlobalBatchSampler: hand-checked layouts, errors, resume, Lightning's epoch hook and the step-set property."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from cases import expected_steps, step_sets
from fits import QUIET_TRAINER
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from lightning_accum import GlobalBatchSampler


def rank_batches(n: int, b: int, k: int, r: int, **kwargs) -> list[list[list[int]]]:
    """Every rank's list of micro-batches for one epoch."""
    return [list(GlobalBatchSampler(n, b, k, num_replicas=r, rank=rank, **kwargs)) for rank in range(r)]


# ---------------------------------------------------------------------------------------------- hand-checked


def test_single_process_unshuffled_is_plain_batching() -> None:
    assert list(GlobalBatchSampler(7, 3, shuffle=False)) == [[0, 1, 2], [3, 4, 5], [6]]


def test_two_ranks_accumulation_layout() -> None:
    # E = 2 ranks * K=2 * B=2 = 8: window 0 is 0..7 cut into micro-batches q=0..3, q -> rank q % 2;
    # the last window holds 8..10: m = ceil(3 / 4) = 1 micro-batch per rank, sizes 2 and 1.
    rank0, rank1 = rank_batches(11, 2, 2, 2, shuffle=False)
    assert rank0 == [[0, 1], [4, 5], [8, 9]]
    assert rank1 == [[2, 3], [6, 7], [10]]


def test_short_rank_gets_flagged_padding_and_same_length() -> None:
    # 9 samples, E = 4 ranks * 2: the last window holds sample 8 only; ranks 1..3 get one padding slot.
    per_rank = rank_batches(9, 2, 1, 4, shuffle=False)
    assert [batches[-1] for batches in per_rank] == [[8], [-1], [-1], [-1]]
    assert {len(b) for b in per_rank} == {2}
    assert [len(GlobalBatchSampler(9, 2, 1, 4, rank)) for rank in range(4)] == [2, 2, 2, 2]


def test_partial_last_window_uses_fewer_micro_batches() -> None:
    # E = 1 * 4 * 2 = 8, 11 samples: the last window holds 3 samples -> ceil(3/2) = 2 micro-batches of 2 and 1.
    batches = list(GlobalBatchSampler(11, 2, 4, num_replicas=1, rank=0, shuffle=False))
    assert batches == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10]]


def test_drop_last_drops_only_the_partial_window() -> None:
    per_rank = rank_batches(11, 2, 1, 2, shuffle=False, drop_last=True)
    assert per_rank == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    assert len(GlobalBatchSampler(11, 2, 1, 2, 0, drop_last=True)) == 2


def test_epochs_reshuffle_and_seed_matters() -> None:
    sampler = GlobalBatchSampler(20, 4, seed=5)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert first != second
    assert sorted(i for b in first for i in b) == sorted(i for b in second for i in b) == list(range(20))
    assert first != list(GlobalBatchSampler(20, 4, seed=6))


def test_len_matches_iteration() -> None:
    for n, b, k, r in [(1, 1, 1, 1), (5, 2, 3, 2), (64, 4, 2, 2), (65, 4, 2, 2), (3, 5, 2, 4)]:
        for rank in range(r):
            sampler = GlobalBatchSampler(n, b, k, r, rank)
            assert len(sampler) == len(list(sampler))


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset_size": 0}, r"`dataset_size` must be a positive int, got 0"),
        ({"micro_batch_size": 0}, r"`micro_batch_size` must be a positive int, got 0"),
        ({"micro_batch_size": 2.0}, r"`micro_batch_size` must be a positive int, got 2.0"),
        ({"accumulate_grad_batches": 0}, r"`accumulate_grad_batches` must be a positive int"),
        ({"num_replicas": 0, "rank": 0}, r"`num_replicas` must be a positive int"),
        ({"num_replicas": 2, "rank": 2}, r"`rank` must be an int in \[0, 1\] for num_replicas=2, got 2"),
        ({"seed": "1"}, r"`seed` must be an int"),
        ({"dataset_size": 7, "drop_last": True}, r"drop_last=True drops every sample: dataset_size=7 .* = 8"),
    ],
)
def test_argument_errors(kwargs: dict, match: str) -> None:
    args = {"dataset_size": 10, "micro_batch_size": 2, "accumulate_grad_batches": 2, "num_replicas": 2, "rank": 0}
    with pytest.raises(ValueError, match=match):
        GlobalBatchSampler(**{**args, **kwargs})


def test_set_epoch_rejects_negative() -> None:
    with pytest.raises(ValueError, match="`epoch` must be a non-negative int, got -1"):
        GlobalBatchSampler(4, 2).set_epoch(-1)


# ---------------------------------------------------------------------------------------------- resume


def test_resume_mid_epoch_continues_where_it_stopped() -> None:
    sampler = GlobalBatchSampler(23, 2, 3, num_replicas=2, rank=1, seed=4)
    sampler.set_epoch(2)
    full = list(sampler)
    it = iter(sampler)
    seen = [next(it) for _ in range(4)]

    resumed = GlobalBatchSampler(23, 2, 3, num_replicas=2, rank=1, seed=4)
    resumed.resume(2, 4, sampler.layout())
    resumed.set_epoch(2)  # Lightning calls set_epoch with the resumed epoch; the position survives
    assert seen + list(resumed) == full
    assert list(resumed) == full  # the next pass is a whole epoch again


def test_resume_at_step_boundary_with_another_split() -> None:
    # Saved by 1 rank x K=4 x B=2 after 2 optimizer steps (8 micro-batches); resumed by 2 ranks x K=1 x B=4 (same E).
    single = GlobalBatchSampler(30, 2, 4, num_replicas=1, rank=0, seed=9)
    resumed = []
    for rank in range(2):
        sampler = GlobalBatchSampler(30, 4, 1, num_replicas=2, rank=rank, seed=9)
        sampler.resume(0, 8, single.layout())
        resumed.append(list(sampler))
    assert step_sets(resumed, 1) == expected_steps(30, 8, seed=9, epoch=0)[2:]


def test_resume_position_belongs_to_its_epoch() -> None:
    # Lightning sets the epoch on batch_sampler.sampler, bypassing GlobalBatchSampler.set_epoch.
    sampler = GlobalBatchSampler(30, 2, 4, num_replicas=1, rank=0, seed=9)
    sampler.resume(1, 8, sampler.layout())
    sampler.sampler.set_epoch(2)
    whole = GlobalBatchSampler(30, 2, 4, num_replicas=1, rank=0, seed=9)
    whole.set_epoch(2)
    assert list(sampler) == list(whole)


def test_resume_after_a_complete_epoch_with_another_split() -> None:
    # 1 x K=4 x B=2 has 4 * 3 + 3 = 15 micro-batches in an epoch of 30; 2 x K=1 x B=4 has 4 per rank.
    done = GlobalBatchSampler(30, 2, 4, num_replicas=1, rank=0, seed=9)
    assert len(done) == len(list(done)) == 15
    resumed = GlobalBatchSampler(30, 4, 1, num_replicas=2, rank=1, seed=9)
    resumed.resume(0, 15, done.layout())
    assert resumed.start == len(resumed) == 4
    assert list(resumed) == []
    resumed.set_epoch(1)
    assert len(list(resumed)) == 4


def test_resume_errors_name_the_mismatch() -> None:
    layout = GlobalBatchSampler(30, 2, 4, num_replicas=1, rank=0, seed=9).layout()
    with pytest.raises(ValueError, match=r"saved sampler has seed=9, this one 1\. .*seed=9"):
        GlobalBatchSampler(30, 2, 4, num_replicas=1, rank=0, seed=1).resume(0, 0, layout)
    with pytest.raises(ValueError, match=r"saved effective batch is 8 .* this sampler's is 16"):
        GlobalBatchSampler(30, 4, 4, num_replicas=1, rank=0, seed=9).resume(0, 0, layout)
    with pytest.raises(ValueError, match="different split 1 micro-batches into an optimizer step"):
        GlobalBatchSampler(30, 4, 2, num_replicas=1, rank=0, seed=9).resume(0, 1, layout)


# ---------------------------------------------------------------------------------------------- Lightning


class IndexData(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i)])


class RecordIndices(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.setdefault(self.current_epoch, []).extend(int(i) for i in batch.flatten())
        return (self.w * batch).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_sets_the_epoch_through_batch_sampler_sampler() -> None:
    sampler = GlobalBatchSampler(10, 3, accumulate_grad_batches=2, seed=7)
    model = RecordIndices()
    trainer = pl.Trainer(
        max_epochs=2,
        accumulate_grad_batches=2,
        use_distributed_sampler=False,
        **QUIET_TRAINER,
    )
    trainer.fit(model, DataLoader(IndexData(10), batch_sampler=sampler))
    for epoch in (0, 1):
        order = torch.randperm(10, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        assert model.seen[epoch] == order
    assert trainer.global_step == 2 * math.ceil(10 / 6)


# ---------------------------------------------------------------------------------------------- property


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 200),
    r=st.integers(1, 4),
    k=st.integers(1, 4),
    b=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    epoch=st.integers(0, 3),
    drop_last=st.booleans(),
)
def test_every_split_steps_through_the_same_windows(
    n: int, r: int, k: int, b: int, seed: int, epoch: int, drop_last: bool
) -> None:
    e = r * k * b
    assume(not (drop_last and n < e))  # refused at construction (tested with the bad arguments above)
    per_rank = []
    for rank in range(r):
        sampler = GlobalBatchSampler(n, b, k, num_replicas=r, rank=rank, seed=seed, drop_last=drop_last)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
        assert len(per_rank[-1]) == len(sampler)
    assert len({len(batches) for batches in per_rank}) == 1  # same number of micro-batches: no DDP hang
    batches = [batch for rank_batches_ in per_rank for batch in rank_batches_]
    assert all(0 < len(batch) <= b for batch in batches)
    assert all(batch == [-1] or -1 not in batch for batch in batches)  # padding only fills an empty slot
    steps = step_sets(per_rank, k)
    assert steps == expected_steps(n, e, seed, epoch, drop_last)
    used = [i for step in steps for i in step]
    assert len(used) == len(set(used))  # no sample repeats
    single = GlobalBatchSampler(n, e, 1, num_replicas=1, rank=0, seed=seed, drop_last=drop_last)
    single.set_epoch(epoch)
    assert steps == [sorted(batch) for batch in single]
