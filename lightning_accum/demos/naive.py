"""``NaiveCausalLM``: the usual Lightning recipe, a mean loss per micro-batch, kept for comparisons."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_accum.demos.models import CausalLM


class NaiveCausalLM(CausalLM):
    """``CausalLM`` whose ``training_step`` returns the micro-batch's mean token loss (no ``SampleCountRescaler``).

    Lightning then divides by K and DDP averages over ranks, so each token's weight depends on the
    micro-batch it landed in. Only for measurement, and unchanged by it: it logs per optimizer step the
    window's global item-mean loss and item count under the keys ``SampleCountRescaler`` uses
    (``train/loss``, ``train/items``), so naive and exact runs are plotted on the same axes.

    Examples:
        >>> lm = NaiveCausalLM(vocab_size=5, embed_dim=2, hidden_size=3)
        >>> batch = {"input_ids": torch.tensor([[1, 2], [3, 0]]), "targets": torch.tensor([[2, 4], [4, 0]]),
        ...          "mask": torch.tensor([[True, True], [True, False]]), "valid": torch.tensor([True, True])}
        >>> losses, mask = lm.token_losses(batch)
        >>> bool(torch.isclose(lm.training_step(batch, 0), losses[mask].mean()))
        True
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._window = torch.zeros(2, dtype=torch.float64)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        losses, mask = self.token_losses(batch)
        counted = losses[mask]
        self._window = self._window.to(losses.device) + torch.stack(
            [counted.detach().sum().double(), torch.tensor(float(counted.numel()), device=losses.device).double()]
        )
        return counted.mean()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        loss_sum, items = self.trainer.strategy.reduce(self._window, reduce_op="sum")
        self._window = torch.zeros_like(self._window)
        self.log("train/loss", (loss_sum / items).float(), on_step=True, on_epoch=False, batch_size=1)
        self.log("train/items", items.float(), on_step=True, on_epoch=False, batch_size=1)
