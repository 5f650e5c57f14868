"""One priced pass: the cheapest grouping of every prefix of a window when each run costs a price on top.

With a price ``p / q`` per run, the best grouping of the first ``j`` samples into any number of runs costs
``V[j] = min over fitting runs [i, j) of V[i] + q * weight(i, j) + p`` (everything times ``q``, to stay in
integers). Because the weight obeys the quadrangle inequality, a later start that is at least as good as an
earlier one at some end stays so at every later end; one queue of candidate starts, each owning the ends
where it is best, finds all ``V`` in ``O(n log w)`` weights for runs of at most ``w`` samples (a new start
wins over an older one at the latest where the older one's runs stop fitting). Groupings of
equal cost are told apart by their number of runs: the pass reports the fewest (or the most) among the
cheapest, prefix by prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_accum.data.runs import Runs


@dataclass(frozen=True)
class PricedPass:
    """The cheapest cost ``values[j]`` of every prefix ``j`` at one price, and its fewest or most runs ``counts[j]``."""

    values: Sequence[int]
    counts: Sequence[int]


def priced_pass(runs: Runs, price: int, scale: int, most: bool) -> PricedPass:
    """Cheapest groupings of every prefix of ``runs`` when a run costs ``scale * weight + price``.

    Among the cheapest groupings of a prefix, ``counts`` holds the fewest runs, or the most with ``most``.

    Examples:
        >>> runs = Runs([1, 1, 4, 4], max_samples=None, max_tokens=None)
        >>> cheap, dear = priced_pass(runs, 0, 1, most=True), priced_pass(runs, runs.bound(), 1, most=False)
        >>> cheap.counts, dear.counts  # free runs: one per sample; dear runs: the fewest, one
        ([0, 1, 2, 3, 4], [0, 1, 1, 1, 1])
    """
    n = runs.size
    first_start, lengths, last_end = runs.first_start, runs.lengths, runs.last_end
    heavy, square, tie = runs.padding_weight * scale, runs.square_weight * scale, -1 if most else 1
    per_run = price * (n + 1) + tie  # one run's price, and the count tie-break below every cost difference
    heavy, square, per_start = heavy * (n + 1), square * (n + 1), scale * (n + 1)
    # Whether a newer start is at least as good as an older one for the run ending at ``end``: with
    # ``d = newer - older`` the difference of their costs is ``values[older] - values[newer] + d * (per_start
    # + linear[end] + quadratic[end] * (2 end - older - newer))``, which grows with ``end``.
    linear = [0, *(heavy * length for length in lengths)]
    quadratic = [0, *(square * length * length for length in lengths)]
    values = [0] * (n + 1)
    counts = [0] * (n + 1)
    starts, owns_from = [0], [1]  # candidate starts, and the first end each is best for
    head = 0
    for end in range(1, n + 1):
        while head + 1 < len(starts) and owns_from[head + 1] <= end:
            head += 1
        start = starts[head]
        padded = lengths[end - 1] * (end - start)
        value = values[end] = values[start] + (heavy + square * padded) * padded - per_start * start + per_run
        counts[end] = counts[start] + 1
        if end == n:
            break
        while len(starts) > head:
            older, at = starts[-1], max(owns_from[-1], end + 1)
            gap = end - older
            if older >= first_start[at] and (
                values[older] - value + gap * (per_start + linear[at] + quadratic[at] * (2 * at - older - end)) < 0
            ):
                break
            starts.pop()
            owns_from.pop()
        if len(starts) == head:
            starts.append(end)
            owns_from.append(end + 1)
            continue
        # The newer start loses at low and wins past the older one's last end: find where it first wins.
        older = starts[-1]
        low, high = max(owns_from[-1], end + 1), min(n, last_end[older]) + 1
        base, gap, twice = values[older] - value, end - older, older + end
        step = 1
        while low + step < high:  # gallop: the newer start mostly wins soon after
            probe = low + step
            if base + gap * (per_start + linear[probe] + quadratic[probe] * (2 * probe - twice)) >= 0:
                high = probe
                break
            low, step = probe, 2 * step
        while high - low > 1:
            middle = (low + high) // 2
            if base + gap * (per_start + linear[middle] + quadratic[middle] * (2 * middle - twice)) >= 0:
                high = middle
            else:
                low = middle
        if high <= n:
            starts.append(end)
            owns_from.append(high)
    values = [(value - tie * count) // (n + 1) for value, count in zip(values, counts, strict=True)]
    return PricedPass(values, counts)
