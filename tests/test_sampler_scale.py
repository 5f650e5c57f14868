"""The data path at scale keeps every order: windows sliced from a tensor, drawn ahead or lazily, lengths as arrays.

References are independent of the sampler: ``torch.randperm`` seeded by ``seed + epoch`` for the order, and the
windows a small ``GlobalBatchSampler`` cuts from a plain list of lengths.
"""

from __future__ import annotations

import threading
import zlib
from array import array

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_accum import GlobalBatchSampler
from lightning_accum.data import permutation


def randperm(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 5000), seed=st.integers(-(2**40), 2**40), stop=st.integers(1, 5000))
def test_lazy_shuffle_is_randperm(n: int, seed: int, stop: int) -> None:
    stop = min(stop, n)
    lazy = permutation.LazyShuffle(n, seed)
    assert lazy.take(0, stop // 2) + lazy.take(stop // 2, stop) == randperm(n, seed)[:stop]


@pytest.fixture
def drawn_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every dataset takes the large-dataset path: background draws, lazy first windows, next epoch ahead."""
    monkeypatch.setattr(permutation, "DRAW_AHEAD_FROM", 1)


@pytest.mark.parametrize("shuffle", [True, False])
def test_drawn_ahead_epochs_keep_the_order(drawn_ahead, shuffle: bool) -> None:
    sampler = GlobalBatchSampler(1000, 8, accumulate_grad_batches=2, num_replicas=3, rank=1, seed=7, shuffle=shuffle)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = randperm(1000, 7 + epoch) if shuffle else list(range(1000))
        windows = [order[start : start + 48] for start in range(0, 1000, 48)]
        expected = [batch for window in windows for batch in window_batches(window, rank=1)]
        assert list(sampler) == expected


def window_batches(window: list[int], rank: int) -> list[list[int]]:
    """Rank ``rank``'s micro-batches of one window on 3 ranks, B = 8: equal consecutive cuts dealt round robin."""
    slots = 3 * -(-len(window) // 24)
    base, extra = divmod(len(window), slots)
    cuts = [sum(base + (q < extra) for q in range(p)) for p in range(slots + 1)]
    return [window[cuts[q] : cuts[q + 1]] or [-1] for q in range(rank, slots, 3)]


def test_resume_far_into_a_drawn_ahead_epoch(drawn_ahead) -> None:
    sampler = GlobalBatchSampler(1000, 8, accumulate_grad_batches=2, num_replicas=3, rank=1, seed=7)
    sampler.resume(epoch=0, micro_batches=30, layout=sampler.layout())
    order = randperm(1000, 7)
    windows = [order[start : start + 48] for start in range(0, 1000, 48)]
    assert list(sampler) == [batch for window in windows for batch in window_batches(window, 1)][30:]


def test_a_changed_randperm_stops_iteration(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def changed(n: int, seed: int) -> torch.Tensor:  # ready only when released, and in another order
        release.wait()
        return torch.arange(n, dtype=torch.int32)

    monkeypatch.setattr(permutation, "draw_permutation", changed)
    draw = permutation.BackgroundDraw(100, 3)
    order = permutation.EpochOrder(100, seed=3, draw=draw)
    assert order.take(0, 10) == randperm(100, 3)[:10]  # served by the lazy shuffle while the draw runs
    release.set()
    draw.result()
    with pytest.raises(RuntimeError, match="no longer runs the Fisher-Yates swaps"):
        order.take(10, 20)


@pytest.mark.parametrize("kind", ["numpy", "tensor", "int32 tensor"])
def test_lengths_as_an_array_group_as_the_list(kind: str) -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(1, 50, size=90)
    lengths = {"numpy": values, "tensor": torch.from_numpy(values), "int32 tensor": torch.from_numpy(values).int()}
    as_list = GlobalBatchSampler(90, 4, 2, seed=1, lengths=values.tolist(), max_tokens=200)
    as_array = GlobalBatchSampler(90, 4, 2, seed=1, lengths=lengths[kind], max_tokens=200)
    assert list(as_array) == list(as_list)
    assert as_array.layout() == as_list.layout()
    assert as_array.layout()["grouping"]["lengths_crc32"] == zlib.crc32(array("q", values.tolist()).tobytes())


@pytest.mark.parametrize(
    ("lengths", "match"),
    [
        (np.array([1.0, 2.0, 3.0]), "1-d array of positive ints"),
        (torch.tensor([[1, 2, 3]]), "one length per sample"),
        (np.array([True, True, True]), "1-d array of positive ints"),
        (np.array([3, 0, 2]), "got 0 for sample 1"),
    ],
)
def test_array_lengths_errors(lengths, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GlobalBatchSampler(3, 1, lengths=lengths)
