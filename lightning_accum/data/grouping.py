"""Length grouping inside one window: cut its samples into micro-batches with the fewest padded tokens.

A micro-batch of samples padded to its longest costs ``longest * samples`` padded tokens. Under exact item
weighting the update depends only on the window's set of samples, so ``GlobalBatchSampler(lengths=...)`` may
regroup each window freely. Grouping the length-sorted window into consecutive runs loses nothing: for any
grouping, refilling the same group sizes from the longest samples down gives no group a longer longest
sample. ``length_groups`` finds the runs with the least padding by dynamic programming, ties going to the most
even groups, and ``assign_groups`` deals them to the ranks with balanced padded tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_INFEASIBLE = 2**62


def length_groups(
    lengths: Sequence[int], num_groups: int, max_samples: int | None = None, max_tokens: int | None = None
) -> list[list[int]]:
    """Split positions ``0..len(lengths)-1`` into ``num_groups`` groups with the fewest padded tokens.

    A group holds at most ``max_samples`` samples and at most ``max_tokens`` padded tokens (its longest length
    times its samples); ``None`` means no limit. Groups are runs of the length-sorted positions, shortest
    first; among the groupings with the fewest padded tokens the one with the smallest sum of squared padded
    sizes wins (the most even): splitting a run never adds padding, so a group is empty only when there are
    fewer samples than groups. Time and memory ``O(num_groups * n * w)`` for ``n`` samples and runs of at
    most ``w`` samples (``max_samples``, or ``max_tokens`` over the shortest length).

    Raises ``ValueError`` when no grouping fits the limits.

    Example::

        >>> length_groups([5, 1, 5, 2, 9, 1], num_groups=3, max_samples=2)  # padded: 2*1 + 2*5 + 2*9 = 30
        [[1, 5], [3, 0], [2, 4]]
        >>> length_groups([5, 1, 5, 2, 9, 1], num_groups=3, max_tokens=10)  # padded: 3*2 + 2*5 + 1*9 = 25
        [[1, 5, 3], [0, 2], [4]]
        >>> length_groups([3], num_groups=2)
        [[0], []]
    """
    order = sorted(range(len(lengths)), key=lambda position: lengths[position])
    n = len(order)
    longest = torch.tensor([0] + [lengths[p] for p in order], dtype=torch.int64)  # [end]: longest of a run ending there
    widest = n if max_samples is None else min(n, max_samples)
    if max_tokens is not None and n:
        widest = min(widest, max_tokens // max(1, min(lengths)))
    ends = torch.arange(n + 1)[:, None]
    sizes = torch.arange(widest + 1)[None, :]  # candidate run [end - size, end) for every end
    starts = (ends - sizes).clamp(min=0)
    padded = longest[:, None] * sizes
    feasible = ends >= sizes
    if max_tokens is not None:
        feasible &= padded <= max_tokens
    tokens = torch.full((n + 1,), _INFEASIBLE, dtype=torch.int64)
    tokens[0] = 0
    evenness = torch.zeros(n + 1, dtype=torch.int64)
    chosen = []
    for _ in range(num_groups):
        total = torch.where(feasible, tokens[starts] + padded, _INFEASIBLE)
        best = total.min(dim=1, keepdim=True).values
        tie_break = torch.where(total == best, evenness[starts] + padded * padded, _INFEASIBLE)
        size = tie_break.argmin(dim=1, keepdim=True)  # the first minimal size: ties are decided deterministically
        tokens, evenness = best[:, 0], tie_break.gather(1, size)[:, 0]
        chosen.append(size[:, 0])
    if tokens[n] >= _INFEASIBLE:
        raise ValueError(
            f"no grouping of {n} samples into {num_groups} micro-batches respects max_samples={max_samples} "
            f"and max_tokens={max_tokens}."
        )
    groups, end = [], n
    for size in reversed(chosen):
        begin = end - int(size[end])
        groups.append(order[begin:end])
        end = begin
    return groups[::-1]


def padded_tokens(lengths: Sequence[int]) -> int:
    """Padded size of one micro-batch of these lengths: ``longest * samples`` (0 when empty).

    Example::

        >>> padded_tokens([3, 7, 2]), padded_tokens([])
        (21, 0)
    """
    return max(lengths, default=0) * len(lengths)


def assign_groups(costs: Sequence[int], num_replicas: int) -> list[list[int]]:
    """Deal ``len(costs)`` groups to ``num_replicas`` ranks, the same number each, balancing the summed cost.

    Largest cost first, each group goes to the least loaded rank that still has room (the lowest rank on
    a tie). Returns each rank's group positions in the order it runs them. ``len(costs)`` must be a
    multiple of ``num_replicas``.

    Example::

        >>> assign_groups([1, 1, 4, 6], num_replicas=2)
        [[3, 1], [2, 0]]
    """
    per_rank = len(costs) // num_replicas
    ranks: list[list[int]] = [[] for _ in range(num_replicas)]
    loads = [0] * num_replicas
    for group in sorted(range(len(costs)), key=lambda g: (-costs[g], g)):
        rank = min((r for r in range(num_replicas) if len(ranks[r]) < per_rank), key=lambda r: (loads[r], r))
        ranks[rank].append(group)
        loads[rank] += costs[group]
    return ranks


def fewest_micro_batches(lengths: Sequence[int], max_tokens: int) -> int:
    """The fewest micro-batches of at most ``max_tokens`` padded tokens that hold samples of these lengths.

    Greedy from the longest: each micro-batch takes as many of the next longest samples as fit, which no
    grouping beats. Every length must be at most ``max_tokens``.

    Example::

        >>> fewest_micro_batches([9, 1, 1, 1, 5, 5], max_tokens=10)  # [9], [5, 5], [1, 1, 1]
        3
    """
    remaining = sorted(lengths, reverse=True)
    count = 0
    while remaining:
        remaining = remaining[max_tokens // remaining[0] :]
        count += 1
    return count


def smallest_budget(lengths: Sequence[int], windows: Sequence[tuple[int, int]]) -> int:
    """The smallest ``max_tokens`` under which every window of these sample lengths fits its micro-batches.

    ``windows`` holds ``(samples, micro-batches)`` pairs. The hardest window of ``samples`` samples holds the
    longest ones (any other window's sorted lengths are shorter one by one), so the answer is the smallest
    budget at which those fit; a budget of ``ceil(samples / micro-batches)`` longest samples always does.

    Example::

        >>> smallest_budget([9, 1, 1, 1, 5, 5, 2, 2], windows=[(4, 2)])  # the 4 longest 9, 5, 5, 2: [9], [5, 5, 2]
        15
    """
    longest_first = sorted(lengths, reverse=True)

    def fits(budget: int) -> bool:
        return all(fewest_micro_batches(longest_first[:samples], budget) <= slots for samples, slots in windows)

    low = longest_first[0]
    high = max(longest_first[0] * -(-samples // slots) for samples, slots in windows)
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle + 1, high)
    return low


def require_budget(lengths: Sequence[int], windows: Sequence[tuple[int, int]], max_tokens: int) -> None:
    """Raise a ``ValueError`` naming the smallest budget that fits, unless every window fits within ``max_tokens``.

    ``windows`` holds ``(samples, micro-batches)`` pairs, as for ``smallest_budget``.

    Example::

        >>> require_budget([9, 1, 1, 1, 5, 5, 2, 2], windows=[(4, 2)], max_tokens=15)
        >>> require_budget([9, 1, 1, 1, 5, 5, 2, 2], windows=[(4, 2)], max_tokens=12)
        Traceback (most recent call last):
        ...
        ValueError: a window of the 4 longest samples does not fit its 2 micro-batches of max_tokens=12 padded ...
    """
    needed = smallest_budget(lengths, windows)
    if max_tokens >= needed:
        return
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[longest] > max_tokens:
        problem = f"sample {longest} has {lengths[longest]} tokens, more than max_tokens={max_tokens}"
    else:
        longest_first = sorted(lengths, reverse=True)
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
