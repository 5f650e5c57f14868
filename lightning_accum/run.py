"""``Run``: what a weighting engine knows of the fit, built once per fit by the callback."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # only read from: engines stay free of Lightning
    import lightning.pytorch as pl


def _unchanged(tensor: Tensor) -> Tensor:
    """The all-reduce of one process."""
    return tensor


@dataclass(frozen=True)
class StrategyReduce:
    """All-reduce through a Lightning strategy (picklable, as ``ddp_spawn`` sends callbacks to its ranks)."""

    strategy: Any
    op: str

    def __call__(self, tensor: Tensor) -> Tensor:
        return self.strategy.reduce(tensor, reduce_op=self.op)


@dataclass
class Run:
    """The fit's constants as an engine sees them; only ``accumulate_grad_batches`` changes during a fit.

    ``accumulate_grad_batches`` is the K that Lightning divides each loss by (1 with manual optimization, where
    the module decides its windows; refreshed at each batch under a schedule); ``reduce_sum`` and
    ``reduce_mean`` all-reduce a tensor over the data-parallel ranks; ``device`` holds the window's totals.
    ``module_name`` and ``helper`` (``"sample_loss"`` or ``"sample_backward"``) name what error messages point at;
    ``count_items(batch)`` is look-ahead mode's count rule.

    Examples:
        >>> run = Run.single_process(accumulate_grad_batches=4)
        >>> run.world_size, run.helper, run.reduce_sum(torch.tensor(3.0))
        (1, 'sample_loss', tensor(3.))
    """

    accumulate_grad_batches: int
    world_size: int
    device: torch.device
    reduce_sum: Callable[[Tensor], Tensor]
    reduce_mean: Callable[[Tensor], Tensor]
    automatic: bool = True
    module_name: str = "The LightningModule"
    count_items: Callable[[Any], Tensor] | None = None

    @property
    def helper(self) -> str:
        """The mixin method that hands this run's per-item losses over."""
        return "sample_loss" if self.automatic else "sample_backward"

    @classmethod
    def single_process(cls, accumulate_grad_batches: int = 1) -> Run:
        """A run in one process on the CPU (for examples and tests without a Trainer)."""
        return cls(accumulate_grad_batches, 1, torch.device("cpu"), _unchanged, _unchanged)

    @classmethod
    def of_fit(
        cls, trainer: pl.Trainer, pl_module: pl.LightningModule, count_items: Callable[[Any], Tensor] | None
    ) -> Run:
        """The run of a Lightning fit (at its ``setup``); ``count_items`` defaults to the module's."""
        automatic = pl_module.automatic_optimization
        strategy = trainer.strategy
        return cls(
            accumulate_grad_batches=trainer.accumulate_grad_batches if automatic else 1,
            world_size=trainer.world_size,
            device=strategy.root_device,
            reduce_sum=StrategyReduce(strategy, "sum"),
            reduce_mean=StrategyReduce(strategy, "mean"),
            automatic=automatic,
            module_name=type(pl_module).__name__,
            count_items=count_items or getattr(pl_module, "count_items", None),
        )
