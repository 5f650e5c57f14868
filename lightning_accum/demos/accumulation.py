"""One place that decides the accumulation K: a fixed int or an epoch -> K schedule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler

AccumulationK = int | Mapping[int, int]


def normalize_k(k: AccumulationK) -> int | dict[int, int]:
    """Validate ``k`` and return it as an int or a sorted ``{epoch: K}`` dict with int keys.

    Example::

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

    Example::

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


class Accumulation:
    """Turn the configured K into consistent Trainer arguments and callbacks.

    An int K sets ``Trainer(accumulate_grad_batches=K)``. A mapping ``{epoch: K}`` adds a
    ``GradientAccumulationScheduler`` and leaves the Trainer's ``accumulate_grad_batches`` at 1 (the
    scheduler refuses anything else); it also rebuilds the train dataloader each epoch so a sampler
    that groups micro-batches into windows sees the new K.

    Example::

        >>> Accumulation(4).trainer_kwargs(), Accumulation(4).callbacks()
        ({'accumulate_grad_batches': 4}, [])
        >>> scheduled = Accumulation({0: 1, 2: 4})
        >>> scheduled.trainer_kwargs()
        {'accumulate_grad_batches': 1, 'reload_dataloaders_every_n_epochs': 1}
        >>> type(scheduled.callbacks()[0]).__name__
        'GradientAccumulationScheduler'
    """

    def __init__(self, k: AccumulationK = 1) -> None:
        self.k = normalize_k(k)

    def trainer_kwargs(self) -> dict[str, Any]:
        """Arguments this K fixes on the Trainer; the trainer config must not set them."""
        if isinstance(self.k, int):
            return {"accumulate_grad_batches": self.k}
        return {"accumulate_grad_batches": 1, "reload_dataloaders_every_n_epochs": 1}

    def callbacks(self) -> list[Callback]:
        """The scheduler callback for an epoch -> K mapping, none for a fixed K."""
        if isinstance(self.k, int):
            return []
        return [GradientAccumulationScheduler(scheduling=dict(self.k))]
