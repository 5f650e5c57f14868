"""``ItemMeanLoss``: the item-weighted mean of a loss as a torchmetrics ``Metric`` (sums kept, divided last)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


class ItemMeanLoss(Metric):
    """Sum of item losses over the sum of item counts, accumulated over updates (and summed over ranks on sync).

    ``update`` only adds on the device: no host read. ``MeanMetric(nan_strategy="disable")``, the other way to
    skip its host-side nan check, drops the weights in torchmetrics 1.7 to 1.9 and so is not used.

    Examples:
        >>> metric = ItemMeanLoss()
        >>> metric.update(torch.tensor(6.0), torch.tensor(4.0))   # a window of 4 items, mean loss 1.5
        >>> metric.update(torch.tensor(1.0), torch.tensor(1.0))   # a window of 1 item, loss 1.0
        >>> metric.compute()
        tensor(1.4000, dtype=torch.float64)
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("loss_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("items", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, loss_sum: Tensor, items: Tensor) -> None:
        """Add a window's sum of item losses and its item count."""
        self.loss_sum += loss_sum.to(self.loss_sum)
        self.items += items.to(self.items)

    def compute(self) -> Tensor:
        return self.loss_sum / self.items
