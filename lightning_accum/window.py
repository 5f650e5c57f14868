"""The running loss sum and item count of one accumulation window, kept on the device."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_accum.counting import count_dtype


class ItemWindow:
    """Accumulates ``[loss sum, item count]`` over the micro-batches of a window without host syncs.

    Example::

        >>> window = ItemWindow()
        >>> window.add(torch.tensor(3.0), torch.tensor(2.0, dtype=torch.float64))
        >>> window.add(torch.tensor(1.0), torch.tensor(2.0, dtype=torch.float64))
        >>> window.pop(reduce_sum=lambda t: t, device=torch.device("cpu"))
        tensor([4., 4.], dtype=torch.float64)
        >>> window.pop(reduce_sum=lambda t: t, device=torch.device("cpu"))
        tensor([0., 0.], dtype=torch.float64)
    """

    def __init__(self) -> None:
        self._totals: Tensor | None = None

    def add(self, loss_sum: Tensor, items: Tensor) -> None:
        """Add one micro-batch's detached loss sum and item count."""
        if self._totals is None:
            self._totals = torch.zeros(2, dtype=items.dtype, device=items.device)
        self._totals[0] += loss_sum.detach().to(self._totals.dtype)
        self._totals[1] += items

    def pop(self, reduce_sum: Callable[[Tensor], Tensor], device: torch.device) -> Tensor:
        """Return ``[loss sum, items]`` summed over ranks by ``reduce_sum`` (one collective) and reset.

        A rank that saw no micro-batch still joins the collective with zeros on ``device``.
        """
        totals = self._totals
        if totals is None:
            totals = torch.zeros(2, dtype=count_dtype(device), device=device)
        self._totals = None
        return reduce_sum(totals)
