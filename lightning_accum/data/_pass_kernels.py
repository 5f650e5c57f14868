"""The kernels that ``compiled_passes`` compiles with Numba: plain Python over NumPy arrays of 64-bit integers.

Each value is four keys compared in order: padded tokens, squared padded tokens, the start term (all three times
``scale``, plus the price's keys per run) and the run count (lowest; negated to prefer the most runs). The
functions call no other function of this module (a compiled function can call only compiled ones), so the
comparison of keys is written out where it is needed. This module needs only NumPy: importing it does not
import Numba.
"""

from __future__ import annotations

import numpy as np


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
                tokens_apart = tokens[older] - tokens[end] + scale * length * gap
                squares_apart = squares[older] - squares[end] + scale * length * length * gap * (2 * at - older - end)
                starts_apart = starts_key[older] - starts_key[end] + scale * gap
                runs_apart = tie * (counts[older] - counts[end])
                if tokens_apart < 0 or (  # the older start is strictly cheaper there: keep it
                    tokens_apart == 0
                    and (
                        squares_apart < 0
                        or (squares_apart == 0 and (starts_apart < 0 or (starts_apart == 0 and runs_apart < 0)))
                    )
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
            tokens_there = tokens_apart + scale * length * gap
            squares_there = squares_apart + scale * length * length * gap * (2 * middle - older - end)
            if tokens_there < 0 or (  # the older start is still strictly cheaper at this end
                tokens_there == 0
                and (
                    squares_there < 0
                    or (squares_there == 0 and (starts_apart < 0 or (starts_apart == 0 and runs_apart < 0)))
                )
            ):
                low = middle
            else:
                high = middle
        if high <= n:
            starts[top] = end
            owns_from[top] = high
            top += 1
    return tokens, squares, starts_key, counts


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
