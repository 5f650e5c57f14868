"""Look-ahead counting: read a window's batches before its first backward, without consuming them.

Lightning's fit loop takes each batch from a data fetcher that wraps the epoch's batch iterator.
``upcoming_batches`` reads the next batches from that iterator and pushes them back, so the loop
later receives exactly the same batches in the same order; the window's item count is then known
before its first micro-batch, and each micro-batch loss can be scaled exactly (``lookahead_loss_factor``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor


class PeekableIterator(Iterator):
    """An iterator that can read ``n`` items ahead and still yields every item once, in order.

    Example::

        >>> it = PeekableIterator(iter("abcde"))
        >>> it.peek(3)
        ['a', 'b', 'c']
        >>> next(it), next(it)
        ('a', 'b')
        >>> it.peek(5)  # only 3 left
        ['c', 'd', 'e']
        >>> list(it)
        ['c', 'd', 'e']
    """

    def __init__(self, source: Iterator) -> None:
        self.source = source
        self._buffer: deque[Any] = deque()
        self._exhausted = False

    def peek(self, n: int) -> list[Any]:
        """Return the next ``n`` items (fewer at the end) without consuming them."""
        while len(self._buffer) < n and not self._exhausted:
            try:
                self._buffer.append(next(self.source))
            except StopIteration:
                self._exhausted = True
        return list(self._buffer)[:n]

    def __next__(self) -> Any:
        if self._buffer:
            return self._buffer.popleft()
        if self._exhausted:
            raise StopIteration
        return next(self.source)


def upcoming_batches(data_fetcher: Any, n: int) -> list[Any]:
    """The next ``n`` batches (fewer at the epoch's end) that ``data_fetcher`` will hand to the fit loop.

    Batches the fetcher has already prefetched come first; the rest are read from its iterator, which is
    wrapped once in a ``PeekableIterator`` so that the loop still receives them. Relies on the fetchers of
    ``lightning.pytorch.loops.fetchers`` (items are ``(batch, batch_idx, dataloader_idx)``).
    """
    if n <= 0:
        return []
    prefetched = [item[0] for item in getattr(data_fetcher, "batches", [])][:n]
    iterator = data_fetcher.iterator
    if not isinstance(iterator, PeekableIterator):
        iterator = data_fetcher.iterator = PeekableIterator(iterator)
    read = [] if getattr(data_fetcher, "done", False) else iterator.peek(n - len(prefetched))
    return prefetched + [item[0] for item in read]


def lookahead_loss_factor(accumulate_grad_batches: int, world_size: int, global_items: Tensor) -> Tensor:
    """Return ``K * R / N``: a micro-batch's loss sum times this, averaged by Lightning (1/K) and DDP (1/R),
    contributes exactly its share of the window's item mean. An empty window (``N = 0``) gives ``K * R``
    (its loss sums are all zero).

    Example::

        >>> import torch
        >>> lookahead_loss_factor(4, 2, torch.tensor(40.0))
        tensor(0.2000)
    """
    return (accumulate_grad_batches * world_size) / global_items.clamp_min(1)


def as_count(count: Any, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``count_items``'s result as a 0-dim tensor on ``device``; anything but one number is refused.

    Example::

        >>> as_count(3, torch.device("cpu"), torch.float64)
        tensor(3., dtype=torch.float64)
        >>> as_count(torch.tensor([2, 1]), torch.device("cpu"), torch.float64)
        Traceback (most recent call last):
        ...
        ValueError: count_items(batch) must return one count for the whole batch ... got shape (2,)...
    """
    tensor = torch.as_tensor(count, device=device)
    if tensor.numel() != 1:
        raise ValueError(
            "count_items(batch) must return one count for the whole batch (a number or a 0-dim tensor), got shape "
            f"{tuple(tensor.shape)}. Sum the per-sample counts, e.g. `mask.sum()`."
        )
    return tensor.to(dtype).reshape(())
