"""Numba kernels of ``compiled_passes``: importing this module fails without Numba.

Each value is four 64-bit keys compared in order: padded tokens, squared padded tokens, the start term (all three
times ``scale``, plus the price's keys per run) and the run count (lowest; negated to prefer the most runs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
from numba import njit

Function = TypeVar("Function", bound=Callable)


def _compiled(function: Function) -> Function:
    """``function`` compiled without the GIL, its machine code cached beside this file (or in Numba's user-wide
    cache); where no cache can be written, as in a zip-imported wheel, compiled afresh in each process."""
    try:
        return njit(cache=True, nogil=True)(function)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return njit(nogil=True)(function)


@_compiled
def _negative(tokens: int, squares: int, starts: int, runs: int) -> bool:
    """Whether the keys, compared in order, are below zero."""
    if tokens != 0:
        return tokens < 0
    if squares != 0:
        return squares < 0
    if starts != 0:
        return starts < 0
    return runs < 0


@_compiled
def priced_pass(
    lengths: np.ndarray,
    first_start: np.ndarray,
    last_end: np.ndarray,
    scale: int,
    price_tokens: int,
    price_squares: int,
    price_starts: int,
    most: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``priced_passes.priced_pass`` on arrays: the keys of every prefix's cheapest value, and its run count."""
    n = lengths.shape[0]
    tie = -1 if most else 1
    tokens = np.zeros(n + 1, np.int64)
    squares = np.zeros(n + 1, np.int64)
    starts_key = np.zeros(n + 1, np.int64)
    counts = np.zeros(n + 1, np.int64)
    starts = np.zeros(n + 1, np.int64)  # candidate starts, and the first end each is best for
    owns_from = np.zeros(n + 1, np.int64)
    owns_from[0] = 1
    top = 1
    head = 0
    for end in range(1, n + 1):
        while head + 1 < top and owns_from[head + 1] <= end:
            head += 1
        start = starts[head]
        padded = lengths[end - 1] * (end - start)
        tokens[end] = tokens[start] + scale * padded + price_tokens
        squares[end] = squares[start] + scale * padded * padded + price_squares
        starts_key[end] = starts_key[start] - scale * start + price_starts
        counts[end] = counts[start] + 1
        if end == n:
            break
        while top > head:  # drop the candidates the new start beats wherever they still own ends
            older = starts[top - 1]
            at = max(owns_from[top - 1], end + 1)
            gap = end - older
            if older >= first_start[at]:
                length = lengths[at - 1]
                if _negative(
                    tokens[older] - tokens[end] + scale * length * gap,
                    squares[older] - squares[end] + scale * length * length * gap * (2 * at - older - end),
                    starts_key[older] - starts_key[end] + scale * gap,
                    tie * (counts[older] - counts[end]),
                ):
                    break
            top -= 1
        if top == head:
            starts[top] = end
            owns_from[top] = end + 1
            top += 1
            continue
        older = starts[top - 1]
        low = max(owns_from[top - 1], end + 1)
        high = min(n, last_end[older]) + 1
        gap = end - older
        tokens_apart = tokens[older] - tokens[end]
        squares_apart = squares[older] - squares[end]
        starts_apart = starts_key[older] - starts_key[end] + scale * gap
        runs_apart = tie * (counts[older] - counts[end])
        while high - low > 1:  # the first end where the new start wins
            middle = (low + high) // 2
            length = lengths[middle - 1]
            if _negative(
                tokens_apart + scale * length * gap,
                squares_apart + scale * length * length * gap * (2 * middle - older - end),
                starts_apart,
                runs_apart,
            ):
                low = middle
            else:
                high = middle
        if high <= n:
            starts[top] = end
            owns_from[top] = high
            top += 1
    return tokens, squares, starts_key, counts


@_compiled
def read_back(
    lengths: np.ndarray,
    num_groups: int,
    scale: int,
    price_tokens: int,
    price_squares: int,
    price_starts: int,
    tokens: np.ndarray,
    squares: np.ndarray,
    starts_key: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
) -> np.ndarray:
    """``price_search``'s read-back on the keys: the latest start of each cheapest run, from the window's end."""
    n = lengths.shape[0]
    ends = np.empty(num_groups, np.int64)
    ends[num_groups - 1] = n
    end = n
    for left in range(num_groups - 1, 0, -1):
        start = end - 1
        while True:
            if start < left:  # every earlier start leaves fewer samples than runs: the passes disagree
                raise RuntimeError("read_back: no cheapest run ends here; the passes were not taken at one price")
            if low[start] <= left <= high[start]:
                padded = lengths[end - 1] * (end - start)
                if (
                    tokens[start] + scale * padded + price_tokens == tokens[end]
                    and squares[start] + scale * padded * padded + price_squares == squares[end]
                    and starts_key[start] - scale * start + price_starts == starts_key[end]
                ):
                    break
            start -= 1
        ends[left - 1] = start
        end = start
    return ends
