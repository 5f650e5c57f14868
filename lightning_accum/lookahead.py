"""Look-ahead counting parts: an iterator that reads ahead without consuming, and a checked count.

``lightning_internals.upcoming_batches`` wraps the fit loop's batch iterator in a ``PeekableIterator``, so the
loop later receives exactly the batches that look-ahead mode counted, in the same order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor


class PeekableIterator(Iterator):
    """An iterator that can read ``n`` items ahead and still yields every item once, in order.

    Examples:
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


def as_count(count: Any, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``count_items``'s result as a 0-dim tensor on ``device``; anything but one number is refused.

    Examples:
        >>> as_count(3, torch.device("cpu"), torch.float64)
        tensor(3., dtype=torch.float64)
        >>> as_count(torch.tensor([2, 1]), torch.device("cpu"), torch.float64)
        Traceback (most recent call last):
        ...
        ValueError: count_items(batch) must return one count for the whole batch ... got shape (2,)...
    """
    tensor = torch.as_tensor(count)  # where it is: a count of a batch not yet moved to the device is on the host
    if tensor.numel() != 1:
        raise ValueError(
            "count_items(batch) must return one count for the whole batch (a number or a 0-dim tensor), got shape "
            f"{tuple(tensor.shape)}. Sum the per-sample counts, e.g. `mask.sum()`."
        )
    # non_blocking: a blocking host-to-device copy waits for the device (a synchronisation per window on a GPU)
    return tensor.reshape(()).to(device=device, dtype=dtype, non_blocking=True)
