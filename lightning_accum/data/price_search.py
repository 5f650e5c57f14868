"""The cheapest grouping of a window into exactly ``G`` runs, by a search over a price per run.

The cheapest cost ``f(k)`` of ``k`` runs is convex in ``k`` because the run weight obeys the quadrangle inequality.
So for some price ``p / q`` per run the cheapest groupings at that price (``priced_pass``) include one of exactly
``G`` runs, and every grouping of ``G`` runs that is cheapest at that price costs ``f(G)``. The search starts from
prices next to the last window's of the same size, or else from the fewest runs that fit and one run per sample,
and prices each step at the slope between the two closest counts found on either side of ``G`` (never more steps
than the corners of ``f`` between them: 3 to 8 passes in practice). At the final price, the fewest and the most runs
of every prefix's cheapest groupings bound the counts it can have (the fewest alone when the whole window's is
``G``), and the grouping is read back from the last run: the weight's last key (the latest boundaries) makes it
the one the layered dynamic programme chose.
"""

from __future__ import annotations

from lightning_accum.data.compiled_passes import compiled_pass, compiled_read_back
from lightning_accum.data.priced_passes import PricedPass, priced_pass
from lightning_accum.data.runs import Runs

# The price at which the last window of each size and group count was cut, as ``(tokens, squares, runs)``: that many
# padded tokens plus squared padded tokens (the start term dropped) per that many runs. The next such window of the
# same sampler has a close one and tries prices next to it first (``_probes``); its keys stay small, as compiled
# passes need. Any price gives the same groups; only the number of passes depends on it.
_recent_slopes: dict[tuple[int, int], tuple[int, int, int]] = {}


def cheapest_run_ends(runs: Runs, num_groups: int) -> list[int]:
    """The ends of the ``num_groups`` runs of the cheapest grouping (by ``Runs.weight``), in ascending order.

    Fewer samples than groups gives one run per sample and empty runs at the end. Raises ``ValueError`` when
    no grouping into ``num_groups`` runs fits the limits.

    Examples:
        >>> cheapest_run_ends(Runs([1, 1, 2, 5, 5, 9], max_samples=2, max_tokens=None), 3)
        [2, 4, 6]
        >>> cheapest_run_ends(Runs([1, 1, 2, 5, 5, 9], max_samples=None, max_tokens=10), 3)
        [3, 5, 6]
        >>> cheapest_run_ends(Runs([3], max_samples=None, max_tokens=None), 2)
        [1, 1]
    """
    n = runs.size
    if runs.fits_nowhere():
        raise ValueError(f"no grouping of {n} samples into {num_groups} runs fits the limits")
    if num_groups >= n:
        return list(range(1, n + 1)) + [n] * (num_groups - n)
    fewest = many = few_at = None
    hint = _recent_slopes.get((n, num_groups))
    for above, price, scale in () if hint is None else _probes(runs, *hint):
        if (fewest if above else many) is not None:
            continue  # that side is found
        count, cost, low = _priced_count(runs, price, scale)
        if count <= num_groups and (fewest is None or count > fewest):
            fewest, few_cost, few_at = count, cost, (price, scale, low)
        elif count > num_groups and (many is None or count < many):
            many, many_cost = count, cost
        if fewest == num_groups or (fewest is not None and many is not None):
            break
    if fewest is None:
        price, scale = runs.bound(), 1
        fewest, few_cost, low = _priced_count(runs, price, scale)
        few_at = price, scale, low
        if num_groups < fewest:
            raise ValueError(f"no grouping of {n} samples into {num_groups} runs fits the limits")
    if many is None:
        many, many_cost = n, sum(runs.weight(end - 1, end) for end in range(1, n + 1))
    while num_groups != fewest:
        price, scale = few_cost - many_cost, many - fewest  # the slope between the counts on either side
        count, cost, low = _priced_count(runs, price, scale)
        if low.values[n] == scale * few_cost + price * fewest:  # both sides are cheapest at this price
            break
        if count > num_groups:
            many, many_cost = count, cost
        else:
            fewest, few_cost, few_at = count, cost, (price, scale, low)
    else:
        price, scale, low = few_at
    # When the fewest runs of the cheapest groupings is exactly G, every prefix of such a grouping has its own fewest
    # (more would make a cheapest grouping of fewer than G runs): the most runs per prefix need no pass of their own.
    high = low if low.counts[n] == num_groups else _pass(runs, price, scale, most=True)
    if len(_recent_slopes) >= 64:
        _recent_slopes.clear()
    tokens = (2 * price + runs.padding_weight) // (2 * runs.padding_weight)
    squares = (2 * (price - tokens * runs.padding_weight) + runs.square_weight) // (2 * runs.square_weight)
    _recent_slopes[n, num_groups] = tokens, squares, scale
    return compiled_read_back(runs, num_groups, price, scale, low, high) or _read_back(
        runs, num_groups, price, scale, low, high
    )


def _probes(runs: Runs, tokens: int, squares: int, per: int) -> list[tuple[bool, int, int]]:
    """Prices to try first, from the last window's (``tokens`` and ``squares`` per ``per`` runs): an eighth, then a
    half more and less in squared padded tokens, then half a padded token per run more and less; each as
    ``(above, price, scale)``."""
    heavy, square = runs.padding_weight, runs.square_weight
    near = [
        (sign > 0, tokens * heavy + (squares + sign * (abs(squares) // part)) * square, per)
        for part in (8, 2)
        for sign in (1, -1)
    ]
    return [*near, (True, (2 * tokens + per) * heavy, 2 * per), (False, (2 * tokens - per) * heavy, 2 * per)]


def _priced_count(runs: Runs, price: int, scale: int) -> tuple[int, int, PricedPass]:
    """The fewest runs among the cheapest groupings at a price, their cost without the price, and the pass."""
    low = _pass(runs, price, scale, most=False)
    count = int(low.counts[runs.size])
    return count, (low.values[runs.size] - price * count) // scale, low


def _pass(runs: Runs, price: int, scale: int, most: bool) -> PricedPass:
    """The priced pass, compiled where it can be (``compiled_passes``), else in Python: the same values."""
    return compiled_pass(runs, price, scale, most) or priced_pass(runs, price, scale, most)


def _read_back(runs: Runs, num_groups: int, price: int, scale: int, low: PricedPass, high: PricedPass) -> list[int]:
    """Follow the cheapest runs back from the window's end, keeping a count of runs each prefix can have."""
    values, ends, end = low.values, [runs.size], runs.size
    for left in range(num_groups - 1, 0, -1):
        start = end - 1
        while not (
            low.counts[start] <= left <= high.counts[start]
            and values[start] + scale * runs.weight(start, end) + price == values[end]
        ):
            start -= 1
        ends.append(start)
        end = start
    return ends[::-1]
