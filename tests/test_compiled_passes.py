"""The compiled passes (Numba) compute what the Python passes compute, at every price, ties included.

The grouping tests compare whole windows with the oracle; these compare the two pass implementations directly,
at prices where two run counts are equally cheap (where ``most`` and the read-back's count bounds decide, which a
whole window's search seldom reaches), check the overflow guard that hands a pass back to Python, and that a
Numba which does not import warns once and leaves the passes to Python.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

from lightning_accum.data import compiled_passes, grouping, price_search
from lightning_accum.data.priced_passes import priced_pass
from lightning_accum.data.runs import Runs

needs_numba = pytest.mark.skipif(not compiled_passes.available(), reason="no Numba: pip install -e '.[fast]'")


def random_runs(rng: random.Random) -> Runs:
    lengths = sorted(rng.choice([1, 2, 3, 4, 6, 8, 12]) * rng.randint(1, 4) for _ in range(rng.randint(1, 40)))
    max_samples = rng.choice([None, 2, 3, 5])
    max_tokens = rng.choice([None, lengths[-1] * rng.randint(1, 6)])
    return Runs(lengths, max_samples, max_tokens, wide_keys=True)


def tie_price(runs: Runs, rng: random.Random) -> tuple[int, int]:
    """A price at which two run counts are equally cheap: the slope between two counts, narrowed until no count
    between them is cheaper (or a random price when both passes give one count)."""
    n = runs.size

    def count_and_cost(price: int, scale: int) -> tuple[int, int]:
        pass_ = priced_pass(runs, price, scale, most=False)
        return pass_.counts[n], (pass_.values[n] - price * pass_.counts[n]) // scale

    prices = [rng.randint(0, 2 * runs.longest) * runs.padding_weight for _ in range(2)]
    (few, few_cost), (many, many_cost) = sorted(count_and_cost(price, 1) for price in prices)
    while many > few:
        price, scale = few_cost - many_cost, many - few
        count, cost = count_and_cost(price, scale)
        if scale * cost + price * count == scale * few_cost + price * few:
            return price, scale
        few, few_cost = (count, cost) if count < many else (few, few_cost)
    return prices[0], 1


def random_price(rng: random.Random) -> int:
    """A price per run with each key's digit drawn on its own, negative lower digits included."""
    tokens, squares, starts = rng.randint(0, 400), rng.randint(-(10**6), 10**6), rng.randint(-(10**4), 10**4)
    return (tokens * 2**64 + squares) * 2**64 + starts


def fitting_runs(rng: random.Random, windows: int) -> Iterator[Runs]:
    """The windows among ``windows`` random ones in which every sample fits some run."""
    for _ in range(windows):
        runs = random_runs(rng)
        if not runs.fits_nowhere():
            yield runs


@needs_numba
def test_the_same_values_and_counts_at_every_price() -> None:
    rng = random.Random(3)
    ties = 0
    for runs in fitting_runs(rng, 600):
        price, scale = tie_price(runs, rng) if rng.random() < 0.7 else (random_price(rng), rng.randint(1, 9))
        python = {most: priced_pass(runs, price, scale, most) for most in (False, True)}
        for most, expected in python.items():
            compiled = compiled_passes.compiled_pass(runs, price, scale, most)
            assert list(compiled.values) == expected.values and compiled.counts.tolist() == expected.counts
        ties += python[True].counts[runs.size] > python[False].counts[runs.size]
    assert ties >= 150, ties  # prices where the fewest and the most runs differ, so that ``most`` decides


@needs_numba
def test_the_same_read_back_between_the_fewest_and_the_most_runs() -> None:
    rng = random.Random(5)
    compared = 0
    for runs in fitting_runs(rng, 600):
        price, scale = tie_price(runs, rng)
        low, high = (compiled_passes.compiled_pass(runs, price, scale, most) for most in (False, True))
        python_low, python_high = (priced_pass(runs, price, scale, most) for most in (False, True))
        n = runs.size
        for groups in range(int(low.counts[n]), int(high.counts[n]) + 1):
            python = price_search._read_back(runs, groups, price, scale, python_low, python_high)
            assert compiled_passes.compiled_read_back(runs, groups, price, scale, low, high) == python
            compared += low.counts[n] != high.counts[n]
    assert compared >= 150, compared


@needs_numba
def test_a_pass_that_could_overflow_runs_in_python() -> None:
    """A price whose squared-tokens digit times the samples leaves 64 bits: the guard refuses the compiled pass and
    the dispatch runs the Python one (the grouping tests' "mixed" engine covers such hand-overs inside a search)."""
    runs = Runs([1, 2, 2, 5, 7, 7], None, 14, wide_keys=True)
    fits, overflows = ((5 * 2**64 + squares) * 2**64 for squares in (3, 2**61))
    assert compiled_passes.compiled_pass(runs, fits, 1, most=False) is not None
    assert compiled_passes.compiled_pass(runs, overflows, 1, most=False) is None
    assert price_search._pass(runs, overflows, 1, most=False) == priced_pass(runs, overflows, 1, most=False)


@needs_numba
def test_wide_keys_fall_back_to_the_least_weights_when_a_key_would_not_fit_a_digit() -> None:
    runs = Runs([2**30] * 4, None, None, wide_keys=True)
    assert not runs.wide_keys and runs.square_weight == 4 * 4 + 1
    assert compiled_passes.compiled_pass(runs, runs.bound(), 1, most=False) is None


BROKEN_NUMBA = """
import warnings
warnings.simplefilter("always")
from lightning_accum.data.grouping import length_groups
print(length_groups([5, 1, 5, 2, 9, 1, 3, 3], num_groups=4, max_tokens=12))  # needs the price search
print(length_groups([9, 1, 9, 2, 9, 1, 3, 3], num_groups=4, max_tokens=18))
"""


@pytest.mark.slow
def test_a_numba_that_does_not_import_warns_once_and_the_passes_run_in_python(tmp_path: Path) -> None:
    """As when a Numba built for an older NumPy is installed: one warning that names the error and the fix."""
    (tmp_path / "numba").mkdir()
    (tmp_path / "numba" / "__init__.py").write_text('raise ImportError("Numba needs NumPy 2.0 or less")\n')
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", BROKEN_NUMBA], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("Numba is installed but does not import (Numba needs NumPy 2.0 or less)") == 1
    assert "pip install -U numba" in proc.stderr
    with mock.patch.object(grouping, "compiled", lambda: False):
        expected = [
            grouping.length_groups([5, 1, 5, 2, 9, 1, 3, 3], num_groups=4, max_tokens=12),
            grouping.length_groups([9, 1, 9, 2, 9, 1, 3, 3], num_groups=4, max_tokens=18),
        ]
    assert proc.stdout.splitlines() == [str(groups) for groups in expected]
