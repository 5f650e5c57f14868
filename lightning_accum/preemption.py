"""``StepBoundaryRequeue``: Lightning's Slurm requeue on preemption, at the next optimizer-step boundary.

With ``SLURMEnvironment(auto_requeue=True)`` Lightning saves an HPC checkpoint (``hpc_ckpt_<n>.ckpt`` in
``default_root_dir``) and runs ``scontrol requeue`` from its ``SIGUSR1`` handler (lightning 2.5 and 2.6:
``_SignalConnector._slurm_sigusr_handler_fn``), i.e. wherever the signal interrupts the fit: between a
micro-batch's forward and backward, inside an optimizer step, or, with several ranks, while the ranks are in
different collectives (the checkpoint gathers state). Such a checkpoint cannot resume the uninterrupted
trajectory. This callback takes the signal instead, notes it, and at the next optimizer-step boundary that every
rank reaches, all ranks agree on it (one all-reduce of a flag per step) and call Lightning's own handler there:
the HPC checkpoint then lies at a step boundary, which the requeued job (any split of the same effective batch,
``GlobalBatchLoader``) resumes exactly. The fit then stops; Slurm ends the job and starts it again.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_accum.lightning_internals import requeue_signal


class StepBoundaryRequeue(Callback):
    """Defer Lightning's Slurm auto-requeue (HPC checkpoint and ``scontrol requeue``) to an optimizer-step boundary.

    Add it with ``SLURMEnvironment(auto_requeue=True)`` in ``Trainer(plugins=...)`` (Lightning's default under
    Slurm) and ``#SBATCH --signal=USR1@<seconds>`` or ``scancel --signal=USR1 <job>``. Outside Slurm, or with
    ``auto_requeue=False``, it does nothing.

    Examples:
        >>> from lightning.pytorch.plugins.environments import SLURMEnvironment
        >>> callbacks = [SampleCountRescaler(), StepBoundaryRequeue()]  # doctest: +SKIP
        >>> trainer = pl.Trainer(callbacks=callbacks, plugins=[SLURMEnvironment(auto_requeue=True)])  # doctest: +SKIP
        >>> StepBoundaryRequeue().requested  # no signal noted yet
        False
    """

    def __init__(self) -> None:
        self.requested = False  # the signal arrived on this rank and was not acted on yet
        self._signum: int | None = None
        self._lightning_handler: Any = None
        self._step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._signum = requeue_signal(trainer)
        if self._signum is None:
            return
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "StepBoundaryRequeue must run the fit in the process's main thread, where Python delivers signals."
            )
        self._lightning_handler = signal.getsignal(self._signum)
        if not callable(self._lightning_handler):
            raise RuntimeError(
                f"SLURMEnvironment(auto_requeue=True) installed no handler for signal {self._signum}: another handler "
                "was there first (Lightning then leaves it). Remove it, or requeue it yourself."
            )
        signal.signal(self._signum, self._note)
        self._step = trainer.global_step

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._signum is None or trainer.global_step == self._step:
            return  # inside a window: no step was taken
        self._step = trainer.global_step
        flag = torch.tensor(float(self.requested), device=pl_module.device)
        if float(trainer.strategy.reduce(flag, reduce_op="sum")) == 0:
            return
        self.requested = False
        self._lightning_handler(self._signum, None)  # every rank: the HPC checkpoint; rank 0: scontrol requeue
        trainer.should_stop = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._signum is not None and signal.getsignal(self._signum) == self._note:
            signal.signal(self._signum, self._lightning_handler)
        self._signum = None
