"""``WindowSampler``: the protocol of a batch sampler whose micro-batches form the optimizer steps' windows."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class WindowSampler(Protocol):
    """A batch sampler built for one K, world size and rank, whose micro-batches are cut into the steps' windows.

    ``SampleCountRescaler`` calls ``require_split`` where a window starts, with the Trainer's K, world size and
    rank; a sampler built for another split raises there, naming the fix. ``GlobalBatchSampler`` is one.

    Examples:
        >>> from lightning_accum.data import GlobalBatchSampler
        >>> isinstance(GlobalBatchSampler(10, 2), WindowSampler)
        True
    """

    def require_split(self, accumulate_grad_batches: int, world_size: int, rank: int) -> None:
        """Raise unless this sampler was built for this K, world size and rank."""
