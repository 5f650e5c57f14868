"""The price search groups every window exactly as the layered dynamic programme it replaced.

The oracle is ``scripts/grouping_reference.py`` (the programme and the rank scan as they were): the same groups,
element for element, on random windows (many equal lengths, limits that bind or not, fewer samples than
groups, windows that do not fit) and on windows cut from a dataset as the sampler cuts them.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator
from unittest import mock

import numpy as np
import pytest
import torch
from grouping_reference import reference_assign_groups, reference_length_groups
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_accum.data import compiled_passes, grouping
from lightning_accum.data.grouping import assign_groups, length_groups, padded_tokens
from lightning_accum.data.unpadded import unpadded_run_ends

# How the passes run: compiled (Numba), in Python (no Numba: the least key weights), in Python on the compiled
# passes' wide keys (every compiled pass refused for overflow), and mixed (only the passes with large values refused).
ENGINES = {"compiled": 2**62, "python": None, "wide python": 0, "mixed": 2**21}
HERE = [engine for engine, safe in ENGINES.items() if safe is None or compiled_passes.available()]


@contextlib.contextmanager
def passes_run(engine: str) -> Iterator[None]:
    """Group windows with the passes of ``engine`` (see ``ENGINES``)."""
    safe = ENGINES[engine]
    with (
        mock.patch.object(grouping, "compiled", lambda: safe is not None),
        mock.patch.object(compiled_passes, "_SAFE", safe or 0),
    ):
        yield


def solve(lengths: list[int], groups: int, max_samples: int | None, max_tokens: int | None, oracle: bool = False):
    """One grouping (the library's, or the oracle's), or the error it raises."""
    try:
        return (reference_length_groups if oracle else length_groups)(
            lengths, groups, max_samples=max_samples, max_tokens=max_tokens
        )
    except ValueError:
        return "no grouping fits"


def both(lengths: list[int], groups: int, max_samples: int | None, max_tokens: int | None) -> tuple:
    """The library's and the oracle's grouping, or the error each raises."""
    return solve(lengths, groups, max_samples, max_tokens), solve(lengths, groups, max_samples, max_tokens, True)


@settings(max_examples=600, deadline=None)
@given(
    lengths=st.lists(st.one_of(st.integers(1, 4), st.integers(1, 40)), max_size=28),
    groups=st.integers(1, 12),
    max_samples=st.one_of(st.none(), st.integers(1, 6)),
    max_tokens=st.one_of(st.none(), st.integers(1, 90)),
)
def test_the_same_groups_as_the_dynamic_programme(lengths, groups, max_samples, max_tokens) -> None:
    oracle = solve(lengths, groups, max_samples, max_tokens, oracle=True)
    for engine in HERE:
        with passes_run(engine):
            assert solve(lengths, groups, max_samples, max_tokens) == oracle, engine


@settings(max_examples=200, deadline=None)
@given(costs=st.lists(st.integers(0, 30), max_size=24), ranks=st.integers(1, 6))
def test_the_same_ranks_as_the_scan(costs: list[int], ranks: int) -> None:
    costs = costs[: len(costs) // ranks * ranks]
    assert assign_groups(costs, ranks) == reference_assign_groups(costs, ranks)


@pytest.mark.slow
def test_realistic_windows_match_the_dynamic_programme() -> None:
    """1,000 windows of a many-short, few-long dataset, full and partial, with and without a token budget."""
    rng = random.Random(16)
    gen = torch.Generator().manual_seed(16)
    dataset = torch.exp(torch.randn(20_000, generator=gen) * 0.9 + math.log(40)).round().clamp(2, 400).long().tolist()
    mismatches = 0
    for _ in range(1000):
        r, k, b = rng.randint(1, 8), rng.randint(1, 4), rng.randint(1, 6)
        size = r * k * b if rng.random() < 0.7 else rng.randint(1, r * k * b)
        window = rng.sample(dataset, size)
        groups = r * math.ceil(size / (r * b))
        budget = rng.choice([None, max(window) * rng.randint(1, b), 400 * b])
        oracle = solve(window, groups, b if budget is None else None, budget, oracle=True)
        for engine in (engine for engine in ("python", "compiled") if engine in HERE):
            with passes_run(engine):
                ours = solve(window, groups, b if budget is None else None, budget)
            mismatches += ours != oracle
            if ours != "no grouping fits":
                assert sum(padded_tokens([window[p] for p in group]) for group in ours) >= sum(window)
    assert mismatches == 0


def test_cluster_size_windows_group_alike_compiled_and_in_python() -> None:
    """Windows of 64 ranks (2,048 samples in 512 micro-batches) under a token budget and of 512 ranks (16,384 in
    4,096) under a sample limit, of a many-short, few-long dataset: the compiled passes give the Python passes'
    groups (the oracle's programme is too slow at this size; the two pass implementations share no code)."""
    if not compiled_passes.available():
        pytest.skip("Numba is not installed (pip install -e '.[fast]')")
    rng = np.random.default_rng(64)
    dataset = np.clip(np.rint(np.exp(rng.normal(math.log(300), 0.9, size=100_000))), 8, 4096).astype(np.int64)
    searched = 0
    for samples, groups, max_samples, max_tokens in [(2048, 512, None, 16384)] * 8 + [(16384, 4096, 5, None)] * 2:
        window = rng.choice(dataset, samples - rng.integers(0, 2) * 7, replace=False).tolist()
        results = []
        for engine in ("compiled", "python"):
            with passes_run(engine):
                results.append(length_groups(window, groups, max_samples=max_samples, max_tokens=max_tokens))
        assert results[0] == results[1]
        searched += unpadded_run_ends(np.sort(window), groups, max_samples, max_tokens) is None
    assert searched == 10  # every window needed the price search


def fits_unpadded(lengths: list[int], groups: int, max_samples: int | None, max_tokens: int | None) -> bool:
    """Whether runs of equal lengths only can fill ``groups`` micro-batches within the limits."""
    needed = 0
    for length in set(lengths):
        cap = min(len(lengths), max_samples or len(lengths), (max_tokens or length * len(lengths)) // length)
        if cap == 0:
            return False
        needed += math.ceil(lengths.count(length) / cap)
    return needed <= groups <= len(lengths)


def test_windows_whose_micro_batches_need_no_padding() -> None:
    """More micro-batches than distinct lengths, as at cluster size: the grouping without padding (NumPy, no
    search) gives the oracle's groups, and it is the one that answers (the price search only on a tie)."""
    rng = random.Random(7)
    answered = unpadded = 0
    for _ in range(300):
        distinct, per_group, groups = rng.randint(1, 24), rng.randint(1, 6), rng.randint(8, 48)
        lengths = [rng.randint(1, distinct) * 3 for _ in range(groups * per_group + rng.randint(0, per_group))]
        max_samples = rng.choice([None, per_group + rng.randint(0, 3)])
        max_tokens = rng.choice([None, 3 * distinct * rng.randint(1, per_group + 1)])
        ours, oracle = both(lengths, groups, max_samples, max_tokens)
        assert ours == oracle
        if fits_unpadded(lengths, groups, max_samples, max_tokens):
            unpadded += 1
            answered += unpadded_run_ends(np.sort(np.array(lengths)), groups, max_samples, max_tokens) is not None
            assert sum(padded_tokens([lengths[p] for p in group]) for group in ours) == sum(lengths)
    assert unpadded >= 100 and answered >= 0.95 * unpadded, (unpadded, answered)
