"""Checkpoints inside an accumulation window: carry the window's totals and partial gradients across a resume.

Lightning keeps no accumulated gradients in its checkpoints, so a fit resumed inside a window would step on
a gradient that lacks the window's first micro-batches. When a checkpoint lands inside a window (default
mode), every rank's window totals and flat partial gradients are gathered into the rescaler's state (one
all-reduce to agree, then two all-gathers, at checkpoint time only); the resumed fit puts each rank's share
back before its first batch. At step boundaries nothing is added. The cost is the gradients' size times the
number of ranks, in the checkpoint. Under FSDP (gradients sharded over the ranks) a checkpoint inside a window is
refused when it is saved, and one saved under another strategy when it is resumed: save checkpoints at step
boundaries there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_accum.counting import count_dtype
from lightning_accum.engines import WeightingEngine
from lightning_accum.support import shards_gradients
from lightning_accum.totals import WindowTotals


def gather_partial_window(
    trainer: pl.Trainer, engine: WeightingEngine, params: Sequence[torch.nn.Parameter]
) -> dict[str, Tensor] | None:
    """Every rank's window totals and flat gradients when some rank is inside a window, else ``None``.

    Collective: every rank calls it (Lightning builds the checkpoint on every rank and writes rank 0's).
    """
    if not engine.resumes_mid_window:
        return None
    strategy = trainer.strategy
    local = engine.partial_window()
    device = strategy.root_device
    inside = strategy.reduce(torch.full((), float(local is not None), device=device), reduce_op="sum")
    if not float(inside):
        return None
    if shards_gradients(strategy):  # every rank raises: they all saw the same all-reduced flag
        raise RuntimeError(
            f"SampleCountRescaler cannot save a checkpoint inside an accumulation window under "
            f"{type(strategy).__name__}: the window's partial gradients are sharded over the ranks. Save checkpoints "
            "at optimizer-step boundaries, e.g. ModelCheckpoint(every_n_train_steps=...) or at epoch ends."
        )
    totals = torch.zeros(WindowTotals.size(), dtype=count_dtype(device), device=device) if local is None else local
    grad_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    grads = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params])

    def gather(tensor: Tensor) -> Tensor:
        gathered = strategy.all_gather(tensor)
        return (gathered if trainer.world_size > 1 else gathered.unsqueeze(0)).cpu()

    return {"totals": gather(totals), "grads": gather(grads.to(grad_dtype))}


def restore_partial_window(
    window: dict[str, Any], trainer: pl.Trainer, engine: WeightingEngine, params: Sequence[torch.nn.Parameter]
) -> None:
    """Put back this rank's partial gradients and window totals from ``gather_partial_window``'s state."""
    if shards_gradients(trainer.strategy):
        raise RuntimeError(
            f"The checkpoint was saved inside an accumulation window; {type(trainer.strategy).__name__} shards the "
            "gradients over the ranks and cannot take the window's partial gradients back. Resume it under the "
            "strategy that saved it, or from a checkpoint at a step boundary "
            "(ModelCheckpoint(every_n_train_steps=...))."
        )
    saved_ranks = window["totals"].shape[0]
    if saved_ranks != trainer.world_size:
        raise RuntimeError(
            f"The checkpoint was saved inside an accumulation window on {saved_ranks} rank(s); this fit runs on "
            f"{trainer.world_size}. Resume it on {saved_ranks} rank(s), or from a checkpoint at a step boundary "
            "(ModelCheckpoint(every_n_train_steps=...))."
        )
    rank = trainer.global_rank
    flat = window["grads"][rank]
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).to(device=p.device, dtype=p.dtype)
        offset += p.numel()
    engine.restore_window(window["totals"][rank].to(trainer.strategy.root_device))
