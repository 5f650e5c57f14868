"""The grouping as it was before the price search: the test oracle and the benchmark's "old" column.

``reference_length_groups`` is the layered dynamic programme that ``lightning_accum.data.grouping.length_groups``
replaced (time and memory ``O(groups * samples * run width)``), and ``reference_assign_groups`` the scan over
ranks that the heap replaced. Tests compare the library's output with these, element for element.

Examples:
    >>> reference_length_groups([5, 1, 5, 2, 9, 1], num_groups=3, max_samples=2)
    [[1, 5], [3, 0], [2, 4]]
    >>> reference_assign_groups([1, 1, 4, 6], num_replicas=2)
    [[3, 1], [2, 0]]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_INFEASIBLE = 2**62


def reference_length_groups(
    lengths: Sequence[int], num_groups: int, max_samples: int | None = None, max_tokens: int | None = None
) -> list[list[int]]:
    """Split positions into ``num_groups`` runs of the length-sorted positions with the fewest padded tokens.

    Ties go to the smallest sum of squared padded sizes, then to the smallest last run (backtracking from the
    end). Raises ``ValueError`` when no grouping fits the limits.

    Examples:
        >>> reference_length_groups([5, 1, 5, 2, 9, 1], num_groups=3, max_tokens=10)
        [[1, 5, 3], [0, 2], [4]]
    """
    order = sorted(range(len(lengths)), key=lambda position: lengths[position])
    n = len(order)
    longest = torch.tensor([0] + [lengths[p] for p in order], dtype=torch.int64)
    widest = n if max_samples is None else min(n, max_samples)
    if max_tokens is not None and n:
        widest = min(widest, max_tokens // max(1, min(lengths)))
    ends = torch.arange(n + 1)[:, None]
    sizes = torch.arange(widest + 1)[None, :]
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
        size = tie_break.argmin(dim=1, keepdim=True)
        tokens, evenness = best[:, 0], tie_break.gather(1, size)[:, 0]
        chosen.append(size[:, 0])
    if tokens[n] >= _INFEASIBLE:
        raise ValueError(f"no grouping of {n} samples into {num_groups} micro-batches fits the limits.")
    groups, end = [], n
    for size in reversed(chosen):
        begin = end - int(size[end])
        groups.append(order[begin:end])
        end = begin
    return groups[::-1]


def reference_assign_groups(costs: Sequence[int], num_replicas: int) -> list[list[int]]:
    """Deal groups to ranks, largest cost first, each to the least loaded rank with room (lowest rank on a tie).

    Examples:
        >>> reference_assign_groups([5, 5, 5, 1], num_replicas=2)
        [[0, 2], [1, 3]]
    """
    per_rank = len(costs) // num_replicas
    ranks: list[list[int]] = [[] for _ in range(num_replicas)]
    loads = [0] * num_replicas
    for group in sorted(range(len(costs)), key=lambda g: (-costs[g], g)):
        rank = min((r for r in range(num_replicas) if len(ranks[r]) < per_rank), key=lambda r: (loads[r], r))
        ranks[rank].append(group)
        loads[rank] += costs[group]
    return ranks
