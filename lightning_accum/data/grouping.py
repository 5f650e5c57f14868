"""Length grouping inside one window: cut its samples into micro-batches with the fewest padded tokens.

A micro-batch of samples padded to its longest costs ``longest * samples`` padded tokens. Under exact item
weighting the update depends only on the window's set of samples, so ``GlobalBatchSampler(lengths=...)`` may
regroup each window freely. Grouping the length-sorted window into consecutive runs loses nothing: for any
grouping, refilling the same group sizes from the longest samples down gives no group a longer longest
sample. ``length_groups`` finds the runs with the least padding, ties going to the most even groups: directly
when runs of equal lengths fill the micro-batches (``unpadded``, the common case when micro-batches outnumber
the distinct lengths), else by a search over a price per run (``runs``, ``priced_passes``, ``price_search``);
``assign_groups`` deals them to the ranks with balanced padded tokens.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np
import torch

from lightning_accum.data.compiled_passes import available as compiled
from lightning_accum.data.price_search import cheapest_run_ends
from lightning_accum.data.runs import Runs
from lightning_accum.data.unpadded import unpadded_run_ends


def length_groups(
    lengths: Sequence[int], num_groups: int, max_samples: int | None = None, max_tokens: int | None = None
) -> list[list[int]]:
    """Split positions ``0..len(lengths)-1`` into ``num_groups`` groups with the fewest padded tokens.

    A group holds at most ``max_samples`` samples and at most ``max_tokens`` padded tokens (its longest length
    times its samples); ``None`` means no limit. Groups are runs of the length-sorted positions, shortest
    first; among the groupings with the fewest padded tokens the one with the smallest sum of squared padded
    sizes wins (the most even), then the one whose runs end latest: splitting a run never adds padding, so a
    group is empty only when there are fewer samples than groups. When runs of equal lengths can fill the
    groups, no padding is needed and ``unpadded`` finds the grouping in NumPy; otherwise a search over a price
    per run (``price_search``) finds it with a handful of passes of ``O(n log w)`` for ``n`` samples and runs of at
    most ``w``, in memory ``O(n)``; a full window under ``max_samples`` alone is its sorted runs of
    ``max_samples`` (no other grouping fits).

    Raises ``ValueError`` when no grouping fits the limits.

    Examples:
        >>> length_groups([5, 1, 5, 2, 9, 1], num_groups=3, max_samples=2)  # padded: 2*1 + 2*5 + 2*9 = 30
        [[1, 5], [3, 0], [2, 4]]
        >>> length_groups([5, 1, 5, 2, 9, 1], num_groups=3, max_tokens=10)  # padded: 3*2 + 2*5 + 1*9 = 25
        [[1, 5, 3], [0, 2], [4]]
        >>> length_groups([3], num_groups=2)
        [[0], []]
    """
    table = np.asarray(lengths, dtype=np.int64).reshape(-1)
    positions = np.argsort(table, kind="stable")  # ties in position order
    order = positions.tolist()
    if max_tokens is None and max_samples is not None and len(order) == num_groups * max_samples:
        return positions.reshape(num_groups, max_samples).tolist()  # the only grouping that fits
    ascending = table[positions]
    ends = unpadded_run_ends(ascending, num_groups, max_samples, max_tokens) if 0 < num_groups <= len(order) else None
    try:
        ends = ends or cheapest_run_ends(Runs(ascending, max_samples, max_tokens, wide_keys=compiled()), num_groups)
    except ValueError:
        raise ValueError(
            f"no grouping of {len(order)} samples into {num_groups} micro-batches respects max_samples={max_samples} "
            f"and max_tokens={max_tokens}."
        ) from None
    starts = [0, *ends[:-1]]
    return [order[start:end] for start, end in zip(starts, ends, strict=True)]


def padded_tokens(lengths: Sequence[int]) -> int:
    """Padded size of one micro-batch of these lengths: ``longest * samples`` (0 when empty).

    Examples:
        >>> padded_tokens([3, 7, 2]), padded_tokens([])
        (21, 0)
    """
    return max(lengths, default=0) * len(lengths)


def assign_groups(costs: Sequence[int], num_replicas: int) -> list[list[int]]:
    """Deal ``len(costs)`` groups to ``num_replicas`` ranks, the same number each, balancing the summed cost.

    Largest cost first, each group goes to the least loaded rank that still has room (the lowest rank on
    a tie: a heap of the ranks with room, ``O(groups log ranks)``). Returns each rank's group positions in the
    order it runs them. ``len(costs)`` must be a multiple of ``num_replicas``.

    Examples:
        >>> assign_groups([1, 1, 4, 6], num_replicas=2)
        [[3, 1], [2, 0]]
    """
    per_rank = len(costs) // num_replicas
    ranks: list[list[int]] = [[] for _ in range(num_replicas)]
    with_room = list(range(num_replicas))  # load * num_replicas + rank: a heap of (load, rank) in one int
    dearest_first = np.argsort(-np.asarray(costs, dtype=np.int64).reshape(-1), kind="stable").tolist()
    replace, pop = heapq.heapreplace, heapq.heappop
    for group in dearest_first:  # ties in group order
        rank = with_room[0] % num_replicas
        ranks[rank].append(group)
        if len(ranks[rank]) < per_rank:
            replace(with_room, with_room[0] + costs[group] * num_replicas)
        else:
            pop(with_room)
    return ranks


def fewest_micro_batches(lengths: Sequence[int], max_tokens: int) -> int:
    """The fewest micro-batches of at most ``max_tokens`` padded tokens that hold samples of these lengths.

    Greedy from the longest: each micro-batch takes as many of the next longest samples as fit, which no
    grouping beats. Every length must be at most ``max_tokens``.

    Examples:
        >>> fewest_micro_batches([9, 1, 1, 1, 5, 5], max_tokens=10)  # [9], [5, 5], [1, 1, 1]
        3
    """
    longest_first = sorted(lengths, reverse=True)
    count = position = 0
    while position < len(longest_first):
        position += max_tokens // longest_first[position]
        count += 1
    return count


def _longest_first(lengths: Sequence[int] | torch.Tensor, count: int, chunk: int = 2**22) -> list[int]:
    """The ``count`` largest lengths, longest first (a partial sort: the budget checks read no further).

    A chunk at a time: ``torch.topk`` of a whole 100M-sample table would take 1.5 GB beside it.
    """
    table = torch.as_tensor(lengths)
    candidates = torch.cat([torch.topk(part, min(count, len(part))).values for part in table.split(chunk)] or [table])
    return torch.topk(candidates, min(count, len(candidates))).values.tolist()


def smallest_budget(lengths: Sequence[int] | torch.Tensor, windows: Sequence[tuple[int, int]]) -> int:
    """The smallest ``max_tokens`` under which every window of these sample lengths fits its micro-batches.

    ``windows`` holds ``(samples, micro-batches)`` pairs. The hardest window of ``samples`` samples holds the
    longest ones (any other window's sorted lengths are shorter one by one), so the answer is the smallest
    budget at which those fit; a budget of ``ceil(samples / micro-batches)`` longest samples always does.

    Examples:
        >>> smallest_budget([9, 1, 1, 1, 5, 5, 2, 2], windows=[(4, 2)])  # the 4 longest 9, 5, 5, 2: [9], [5, 5, 2]
        15
    """
    longest_first = _longest_first(lengths, max(samples for samples, _ in windows))

    def fits(budget: int) -> bool:
        return all(fewest_micro_batches(longest_first[:samples], budget) <= slots for samples, slots in windows)

    low = longest_first[0]
    high = max(longest_first[0] * -(-samples // slots) for samples, slots in windows)
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle + 1, high)
    return low


def require_budget(lengths: Sequence[int] | torch.Tensor, windows: Sequence[tuple[int, int]], max_tokens: int) -> None:
    """Raise a ``ValueError`` naming the smallest budget that fits, unless every window fits within ``max_tokens``.

    ``windows`` holds ``(samples, micro-batches)`` pairs, as for ``smallest_budget``.

    Examples:
        >>> require_budget([9, 1, 1, 1, 5, 5, 2, 2], windows=[(4, 2)], max_tokens=15)
        >>> require_budget([9, 1, 1, 1, 5, 5, 2, 2], windows=[(4, 2)], max_tokens=12)
        Traceback (most recent call last):
        ...
        ValueError: a window of the 4 longest samples does not fit its 2 micro-batches of max_tokens=12 padded ...
    """
    needed = smallest_budget(lengths, windows)
    if max_tokens >= needed:
        return
    table = torch.as_tensor(lengths)
    longest = int(table.argmax())  # the first longest sample
    if int(table[longest]) > max_tokens:
        problem = f"sample {longest} has {int(table[longest])} tokens, more than max_tokens={max_tokens}"
    else:
        longest_first = _longest_first(table, max(samples for samples, _ in windows))
        samples, slots = next(
            (samples, slots)
            for samples, slots in windows
            if fewest_micro_batches(longest_first[:samples], max_tokens) > slots
        )
        problem = (
            f"a window of the {samples} longest samples does not fit its {slots} micro-batches of "
            f"max_tokens={max_tokens} padded tokens"
        )
    raise ValueError(
        f"{problem}. Use max_tokens>={needed} (the smallest budget every window of this dataset fits), or "
        "truncate the longest samples, or split the effective batch into more micro-batches (a larger "
        "accumulate_grad_batches with a smaller micro_batch_size)."
    )
