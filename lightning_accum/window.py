"""The running totals of one accumulation window, kept on the device and added when a backward pass runs."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_accum.totals import WindowTotals


class ItemWindow:
    """Sums ``WindowTotals`` over a window's backward passes, on the device, without host synchronisation.

    Examples:
        >>> window = ItemWindow()
        >>> one = torch.ones(WindowTotals.size(), dtype=torch.float64)
        >>> window.add(one)
        >>> window.add(2 * one)
        >>> WindowTotals.unpack(window.take(torch.device("cpu"), torch.float64)).items
        tensor(3., dtype=torch.float64)
        >>> WindowTotals.unpack(window.take(torch.device("cpu"), torch.float64)).items  # the next window is empty
        tensor(0., dtype=torch.float64)
    """

    def __init__(self) -> None:
        self._sum: Tensor | None = None

    def add(self, packed: Tensor) -> None:
        """Add one backward's packed ``WindowTotals`` (detached)."""
        self._sum = packed.detach().clone() if self._sum is None else self._sum.add_(packed.detach())

    @property
    def packed(self) -> Tensor | None:
        """This rank's packed running totals, or ``None`` while no backward has been carried since the last reset."""
        return self._sum

    def reset(self) -> None:
        """Forget the window: its gradients were zeroed or dropped."""
        self._sum = None

    def take(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Return this rank's packed totals and reset; zeros (``dtype`` on ``device``) if no backward was carried."""
        packed, self._sum = self._sum, None
        return torch.zeros(WindowTotals.size(), device=device, dtype=dtype) if packed is None else packed
