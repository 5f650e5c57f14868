"""A callback that destroys the default process group when a distributed fit ends.

Lightning leaves the group alive. In a ``ddp_spawn`` worker, or a ``ddp`` script, a gloo group that is
still alive while the interpreter shuts down can abort the process ("terminate called without an active
exception") after the fit finished; destroying it first makes the exit clean.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch


class ReleaseProcessGroup(pl.Callback):
    """Destroy the default process group in ``teardown`` (after the fit; nothing collective follows it)."""

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
