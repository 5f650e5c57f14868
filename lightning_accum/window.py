"""The running totals of one accumulation window, kept on the device and added when a backward pass runs."""

from __future__ import annotations

import torch
from torch import Tensor


class ItemWindow:
    """Sums fixed-size vectors of totals (``[loss sum, item count, ...]``) over a window without host syncs.

    Example::

        >>> window = ItemWindow(size=2)
        >>> window.add(torch.tensor([3.0, 2.0], dtype=torch.float64))
        >>> window.add(torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> window.take(torch.device("cpu"), torch.float64)
        tensor([4., 4.], dtype=torch.float64)
        >>> window.take(torch.device("cpu"), torch.float64)
        tensor([0., 0.], dtype=torch.float64)
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._totals: Tensor | None = None

    def add(self, values: Tensor) -> None:
        """Add one micro-batch's vector of totals (detached)."""
        if self._totals is None:
            self._totals = torch.zeros(self.size, dtype=values.dtype, device=values.device)
        self._totals += values.detach()

    @property
    def totals(self) -> Tensor | None:
        """This rank's running totals, or ``None`` while no backward has been carried since the last reset."""
        return self._totals

    def reset(self) -> None:
        """Forget the window: its gradients were zeroed or dropped."""
        self._totals = None

    def take(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Return this rank's totals and reset; zeros (of ``dtype`` on ``device``) if no backward was carried."""
        totals = self._totals
        if totals is None:
            totals = torch.zeros(self.size, dtype=dtype, device=device)
        self._totals = None
        return totals
