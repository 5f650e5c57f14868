"""The priced pass and the read-back compiled with Numba (``pip install "lightning-accum[fast]"``), when installed.

The same steps as ``priced_passes.priced_pass`` and ``price_search``'s read-back, on NumPy arrays of 64-bit
integers: a window of 2,048 samples (64 ranks) in about 0.1 ms a pass instead of 4 to 9 ms, without holding the GIL
(the sampler cuts the next window on a thread while the step runs). A run's weight is three keys, each a 64-bit
digit of the folded weight when ``Runs`` is built with ``wide_keys=True``: the padded tokens, their square and minus
the run's start; costs compare key by key, then by number of runs. Before each pass the magnitudes it can reach
are bounded exactly (``_fits_int64``); a pass that could overflow runs in Python instead, with the same result.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Sequence
from functools import cache
from typing import NamedTuple

import numpy as np

from lightning_accum.data import _pass_kernels
from lightning_accum.data.priced_passes import PricedPass
from lightning_accum.data.runs import WIDE_DIGIT, Runs

_SAFE = 2**62  # every key of every value and difference stays below this, so no 64-bit sum overflows


class Kernels(NamedTuple):
    """``_pass_kernels``' functions, compiled."""

    priced_pass: Callable
    read_back: Callable


@cache
def _kernels() -> Kernels | None:
    """The kernels compiled with Numba (at their first call; the machine code cached beside ``_pass_kernels``, or
    in Numba's user-wide cache), or ``None`` without Numba.

    Where no cache can be written, as for a zip-imported wheel, they compile afresh in each process. Numba
    installed but failing to import (e.g. built for another NumPy) warns once, naming the error.
    """
    try:
        from numba import njit
    except ImportError as error:
        if importlib.util.find_spec("numba") is not None:
            warnings.warn(
                f"Numba is installed but does not import ({error}); length-grouped windows are cut by the passes "
                "in Python, the same groups but tens of times slower under max_tokens. Install a Numba that "
                "matches this NumPy (pip install -U numba).",
                RuntimeWarning,
                stacklevel=2,
            )
        return None

    def compiled(function: Callable) -> Callable:
        try:
            return njit(cache=True, nogil=True)(function)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return njit(nogil=True)(function)

    return Kernels(compiled(_pass_kernels.priced_pass), compiled(_pass_kernels.read_back))


def available() -> bool:
    """Whether Numba is installed, so that windows are cut by compiled passes."""
    return _kernels() is not None


class FoldedValues(Sequence[int]):
    """A compiled pass's values, each folded back into one integer as ``Runs.weight`` folds keys."""

    def __init__(self, tokens: np.ndarray, squares: np.ndarray, starts: np.ndarray) -> None:
        self.keys = tokens, squares, starts

    def __len__(self) -> int:
        return len(self.keys[0])

    def __getitem__(self, index: int) -> int:  # type: ignore[override]
        tokens, squares, starts = (int(key[index]) for key in self.keys)
        return (tokens * WIDE_DIGIT + squares) * WIDE_DIGIT + starts


def compiled_pass(runs: Runs, price: int, scale: int, most: bool) -> PricedPass | None:
    """``priced_pass`` compiled, or ``None`` when it cannot run: no Numba, narrow keys, or a risk of overflow.

    Examples:
        >>> from lightning_accum.data.priced_passes import priced_pass
        >>> runs = Runs([1, 1, 2, 5, 5, 9], max_samples=None, max_tokens=10, wide_keys=True)
        >>> compiled = compiled_pass(runs, 7 * runs.padding_weight, 1, most=False)  # 7 padded tokens a run
        >>> python = priced_pass(runs, 7 * runs.padding_weight, 1, most=False)
        >>> python.counts  # the fewest runs of each prefix's cheapest grouping
        [0, 1, 1, 1, 2, 2, 3]
        >>> compiled is None or (list(compiled.values), list(compiled.counts)) == (python.values, python.counts)
        True
    """
    kernels = _kernels()
    if kernels is None or not runs.wide_keys:
        return None
    prices = _digits(price)
    if not _fits_int64(runs, prices, scale):
        return None
    tokens, squares, starts, counts = kernels.priced_pass(
        runs.array, runs.first_start_array, runs.last_end_array, scale, *prices, most
    )
    return PricedPass(FoldedValues(tokens, squares, starts), counts)


def compiled_read_back(
    runs: Runs, num_groups: int, price: int, scale: int, low: PricedPass, high: PricedPass
) -> list[int] | None:
    """The read-back compiled, when both passes were; else ``None``."""
    kernels = _kernels()
    if kernels is None or not all(isinstance(one.values, FoldedValues) for one in (low, high)):
        return None
    ends = kernels.read_back(runs.array, num_groups, scale, *_digits(price), *low.values.keys, low.counts, high.counts)
    return ends.tolist()


def _digits(value: int) -> tuple[int, int, int]:
    """``value`` as three balanced base-2**64 digits ``(a, b, c)``: ``value == (a * 2**64 + b) * 2**64 + c``."""
    low_digits = []
    for _ in range(2):
        digit = (value + WIDE_DIGIT // 2) % WIDE_DIGIT - WIDE_DIGIT // 2
        low_digits.append(digit)
        value = (value - digit) // WIDE_DIGIT
    return value, low_digits[1], low_digits[0]


def _fits_int64(runs: Runs, prices: tuple[int, int, int], scale: int) -> bool:
    """Whether every key of every value the pass computes, and of every difference it compares, stays below 2**62.

    A prefix's value is ``scale`` times its runs' keys plus its run count times the price's: its padded tokens
    are at most ``n * longest``, their squares at most that times the widest run's padded tokens, the starts
    at most ``n * n``; a compared difference adds one run's keys to the difference of two values.
    """
    n, widest = runs.size, runs.widest_padded
    tokens_at_most = n * runs.longest
    bounds = (
        scale * (tokens_at_most + widest) + n * abs(prices[0]),
        scale * (tokens_at_most * widest + widest * widest) + n * abs(prices[1]),
        scale * (n * n + n) + n * abs(prices[2]),
    )
    return 2 * max(bounds) < _SAFE
