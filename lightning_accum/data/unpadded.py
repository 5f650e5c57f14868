"""The grouping of a window whose micro-batches need no padding: each one holds samples of one length.

A window has no fewer padded tokens than its summed lengths, and reaches that sum exactly when every run of its
length-sorted samples holds equal lengths. When the window's blocks of equal lengths fit its micro-batches that
way (a block of ``m`` samples of length ``v`` needs ``ceil(m / cap)`` runs, ``cap`` the samples a run of length
``v`` may hold), the cheapest grouping is such a one, and the rest of ``Runs.weight`` decides which: the sum of
squared padded sizes is least when each block is split as evenly as its number of runs allows, and the latest
boundaries put the larger runs first. So only the number of runs per block is left, a separable convex choice
that the largest marginal gains settle, all in NumPy: a window of 16,384 samples in 4,096 micro-batches (512
ranks) in milliseconds where the price search takes passes over every sample. Frequent at cluster size: the
micro-batches of a window outnumber the distinct lengths its samples can have.
"""

from __future__ import annotations

import numpy as np


def unpadded_run_ends(
    ascending: np.ndarray, num_groups: int, max_samples: int | None, max_tokens: int | None
) -> list[int] | None:
    """The ends of the ``num_groups`` runs of the cheapest grouping (as ``Runs.weight`` orders them), when no run
    needs padding; ``None`` when some must be padded, or when two choices tie on every key (the price search
    then decides).

    ``ascending`` holds the window's lengths sorted ascending, no fewer than ``num_groups``.

    Examples:
        >>> # squared padded sizes: 10**2 + 7**2 + 7**2 = 198 beat 6**2 + 4**2 + 14**2 = 248 (runs [3, 5, 7])
        >>> unpadded_run_ends(np.array([2, 2, 2, 2, 2, 7, 7]), num_groups=3, max_samples=None, max_tokens=None)
        [5, 6, 7]
        >>> unpadded_run_ends(np.array([2, 3, 7]), num_groups=2, max_samples=None, max_tokens=None) is None
        True
    """
    values, block_starts, sizes = np.unique(ascending, return_index=True, return_counts=True)
    if values[0] < 1 or int(values[-1]) * int(sizes.max()) >= 2**31:
        return None  # (the gains below are int64: squared padded sizes under 2**62)
    cap = np.full(len(values), ascending.size, dtype=np.int64)
    if max_samples is not None:
        cap = np.minimum(cap, max_samples)
    if max_tokens is not None:
        cap = np.minimum(cap, max_tokens // values)
    if (cap < 1).any():
        return None
    fewest = -(-sizes // cap)
    extra = num_groups - int(fewest.sum())
    if extra < 0:
        return None
    runs = fewest.copy()
    if extra:
        # Every further run a block could take, with what it gains: less of the squared padded sizes (ahead) and
        # more of the summed run starts (the latest boundaries, behind). The gains shrink run by run within each
        # block (checked: otherwise the price search decides), so the largest gains overall are the best choice.
        block = np.repeat(np.arange(len(values)), sizes - fewest)
        first, samples, before = block_starts[block], sizes[block], fewest[block] + _ranks_within(sizes - fewest)
        squares = values[block] ** 2 * (_even_squares(samples, before) - _even_squares(samples, before + 1))
        starts = _starts_sum(first, samples, before + 1) - _starts_sum(first, samples, before)
        same_block = block[1:] == block[:-1]
        grows = (squares[1:] > squares[:-1]) | ((squares[1:] == squares[:-1]) & (starts[1:] > starts[:-1]))
        if (same_block & grows).any():
            return None
        best_first = np.lexsort((-starts, -squares))
        chosen, left_out = best_first[:extra], best_first[extra : extra + 1]
        if left_out.size and (squares[left_out], starts[left_out]) == (squares[chosen[-1]], starts[chosen[-1]]):
            return None  # a tie on every key
        runs += np.bincount(block[chosen], minlength=len(values))
    small, larger = sizes // runs, sizes % runs  # per block: ``larger`` runs of small + 1 first, then small ones
    run_sizes = np.repeat(
        np.stack([small + 1, small], axis=1).reshape(-1), np.stack([larger, runs - larger], 1).reshape(-1)
    )
    return np.cumsum(run_sizes).tolist()


def _ranks_within(counts: np.ndarray) -> np.ndarray:
    """``0, 1, ..., c - 1`` for each count ``c``, concatenated."""
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(int(counts.sum())) - offsets


def _even_squares(samples: np.ndarray, runs: np.ndarray) -> np.ndarray:
    """The least sum of squared run sizes that ``samples`` samples split into ``runs`` runs can have."""
    small, larger = samples // runs, samples % runs
    return larger * (small + 1) ** 2 + (runs - larger) * small**2


def _starts_sum(first: np.ndarray, samples: np.ndarray, runs: np.ndarray) -> np.ndarray:
    """The summed starts of the even split of a block at ``first`` into ``runs`` runs, the larger ones first."""
    small, larger = samples // runs, samples % runs
    return runs * first + small * runs * (runs - 1) // 2 + larger * (runs - 1) - larger * (larger - 1) // 2
