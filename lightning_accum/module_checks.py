"""Layers whose output for one item depends on the rest of its micro-batch: reported once, at train start."""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn.modules.batchnorm import _BatchNorm


def batch_statistics_layers(module: torch.nn.Module) -> list[str]:
    """``"name (type)"`` of every batch-normalization layer of ``module`` in training mode (it normalizes an item
    with its micro-batch's statistics).

    Examples:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.LayerNorm(4))
        >>> batch_statistics_layers(net)
        ['1 (BatchNorm1d)']
        >>> batch_statistics_layers(net.eval())
        []
    """
    return [
        f"{name} ({type(layer).__name__})"
        for name, layer in module.named_modules()
        if isinstance(layer, _BatchNorm) and layer.training
    ]


def warn_about_batch_statistics(module: torch.nn.Module) -> None:
    """Warn (rank 0) when ``module`` normalizes items with their micro-batch's statistics while it trains.

    An item's loss then depends on which other items share its micro-batch, so a step's gradient depends on how
    the window is split into micro-batches and ranks, whatever the weighting.
    """
    layers = batch_statistics_layers(module)
    if not layers:
        return
    shown = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
    rank_zero_warn(
        f"{type(module).__name__} has batch-normalization layers in training mode ({shown}): each item's loss "
        "depends on the other items of its micro-batch, so the optimizer steps still depend on how a window is "
        "split into micro-batches and ranks (SampleCountRescaler weights the items exactly, but cannot make "
        "their losses independent of the split). For split-invariant steps, use a per-item normalization "
        "(LayerNorm, GroupNorm) or freeze the statistics (put those layers in eval mode).",
        category=UserWarning,
    )
