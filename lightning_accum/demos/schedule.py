"""The accumulation K of a run as a fixed int or an epoch -> K schedule, for data modules that cut windows."""

from __future__ import annotations

from collections.abc import Mapping

AccumulationK = int | Mapping[int, int]


def normalize_k(k: AccumulationK) -> int | dict[int, int]:
    """Validate ``k`` and return it as an int or a sorted ``{epoch: K}`` dict with int keys.

    Examples:
        >>> normalize_k({"2": 4, "0": 1})
        {0: 1, 2: 4}
        >>> normalize_k(0)
        Traceback (most recent call last):
        ...
        ValueError: accumulation K must be an int >= 1 or a mapping epoch -> K >= 1, got 0.
    """
    if isinstance(k, Mapping):
        schedule = {int(epoch): int(value) for epoch, value in k.items()}
        if schedule and min(schedule) >= 0 and min(schedule.values()) >= 1:
            return dict(sorted(schedule.items()))
    elif isinstance(k, int) and not isinstance(k, bool) and k >= 1:
        return k
    raise ValueError(f"accumulation K must be an int >= 1 or a mapping epoch -> K >= 1, got {k!r}.")


def k_at_epoch(k: AccumulationK, epoch: int) -> int:
    """Return the K in force during ``epoch`` (1 before a schedule's first epoch, as Lightning does).

    Examples:
        >>> [k_at_epoch({1: 2, 3: 4}, e) for e in range(5)]
        [1, 2, 2, 4, 4]
        >>> k_at_epoch(8, 3)
        8
    """
    k = normalize_k(k)
    if isinstance(k, int):
        return k
    started = [value for start, value in k.items() if start <= epoch]
    return started[-1] if started else 1
