"""Fits that stop early and resume with ``fit(ckpt_path=...)``: each ends where its stop path leaves it.

Every case trains ``test_sampler_resume``'s data (25 samples, ``randperm(SEED + epoch)`` per epoch) for 3 epochs
with a ``GlobalBatchLoader``, stops inside epoch 1 the way a user's fit stops (a timer, Ctrl+C, SIGTERM,
``max_steps``, a ``GradientAccumulationScheduler`` run killed after a checkpoint), then resumes from the
checkpoint that stop path leaves with a new Trainer. The reference is plain PyTorch that never stopped.
"""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from fits import QUIET_TRAINER, ranks_strategy
from lightning.pytorch.callbacks import (
    Checkpoint,
    GradientAccumulationScheduler,
    ModelCheckpoint,
    OnExceptionCheckpoint,
    Timer,
)
from lightning.pytorch.trainer.states import RunningStage
from reference import flat_parameters
from test_sampler_resume import (
    EFFECTIVE,
    EPOCHS,
    SAMPLES,
    SEED,
    SPLITS,
    WHOLE_EPOCH,
    CountingSampler,
    ResumableModule,
    SaveAndStop,
    SaveInsideWindowAndStop,
    dataset,
    final_parameters,
)
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_accum import GlobalBatchLoader, SampleCountRescaler

SCHEDULE = {0: 2, 1: 3}  # K per epoch (the micro-batch size stays SPLITS[ranks][1]: E is 8, then 12)
STOP_BATCH = 2  # stops come after this batch of epoch 1: with K=2, the first micro-batch of a window


def scheduled_windows() -> list[list[tuple[int, int]]]:
    """Each epoch's windows under ``SCHEDULE``: E = ranks * K * B samples (8 in epoch 0, then 12)."""
    sizes = [EFFECTIVE] + [EFFECTIVE // SCHEDULE[0] * SCHEDULE[1]] * (EPOCHS - 1)
    return [[(s, min(s + size, SAMPLES)) for s in range(0, SAMPLES, size)] for size in sizes]


def uninterrupted(scheduled: bool = False) -> tuple[Tensor, Tensor]:
    """Initial and final parameters of the plain-PyTorch run that never stopped."""
    return final_parameters(scheduled_windows() if scheduled else [WHOLE_EPOCH] * EPOCHS)


class ScheduledModule(ResumableModule):
    """``ResumableModule`` whose sampler is rebuilt every epoch for ``SCHEDULE``'s K of that epoch."""

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch
        k = SCHEDULE[max(e for e in SCHEDULE if e <= epoch)]
        sampler = CountingSampler(
            SAMPLES,
            SPLITS[self.ranks][1],
            k,
            num_replicas=self.trainer.world_size,
            rank=self.trainer.global_rank,
            seed=SEED,
        )
        return GlobalBatchLoader(dataset(), batch_sampler=sampler)


class BatchClockTimer(Timer):
    """Lightning's ``Timer`` (what ``Trainer(max_time=...)`` adds) on a clock of one second per training batch.

    The stop runs through the Timer's own path (``on_train_batch_end`` sets ``should_stop``, its elapsed time
    is saved and restored), at a batch that does not depend on the machine's speed.
    """

    def __init__(self, seconds: int) -> None:
        super().__init__(duration=timedelta(seconds=seconds), interval="step")
        self.batches = 0

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self.batches += 1

    def time_elapsed(self, stage: str = RunningStage.TRAINING) -> float:
        return self._offset + self.batches if stage == RunningStage.TRAINING else 0.0


class StopAt(pl.Callback):
    """After batch ``STOP_BATCH`` of epoch 1: raise ``KeyboardInterrupt`` or send this process SIGTERM."""

    def __init__(self, how: str) -> None:
        self.how = how

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) != (1, STOP_BATCH):
            return
        if self.how == "keyboard_interrupt":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler sets received_sigterm; the loop raises


def make_trainer(ranks: int, callbacks: list[pl.Callback], mode: str = "deferred", **kwargs: Any) -> pl.Trainer:
    strategy, release = ranks_strategy(ranks)
    settings = {
        "accelerator": "cpu",
        "devices": ranks,
        "strategy": strategy,
        "max_epochs": EPOCHS,
        "use_distributed_sampler": False,
        **QUIET_TRAINER,
        "enable_checkpointing": any(isinstance(c, Checkpoint) for c in callbacks),
        **kwargs,
    }
    return pl.Trainer(callbacks=[SampleCountRescaler(mode=mode), *callbacks, *release], **settings)


def first_fit(case: str, tmp_path: Path, ranks: int = 1, mode: str = "deferred", stateful: bool = True) -> Path:
    """Run the fit that stops; the checkpoint its stop path leaves (``stateful=False``: a plain ``DataLoader``)."""
    k = SPLITS[ranks][0]
    if case == "scheduler_killed":  # a checkpoint 1 step into epoch 1, then the process dies
        stop = SaveAndStop(tmp_path / "last.ckpt", stop_step=5, every_batch=mode == "deferred")
        trainer = make_trainer(
            ranks, [stop, GradientAccumulationScheduler(SCHEDULE)], mode, reload_dataloaders_every_n_epochs=1
        )
        trainer.fit(ScheduledModule(ranks, num_workers=0))
        return stop.path
    if case == "scheduler_inside_window":  # a checkpoint after batch 4 of epoch 1, inside a window of K=3
        inside = SaveInsideWindowAndStop(tmp_path / "last.ckpt", tmp_path / "boundary.ckpt", batch_idx=4)
        trainer = make_trainer(
            ranks, [inside, GradientAccumulationScheduler(SCHEDULE)], mode, reload_dataloaders_every_n_epochs=1
        )
        trainer.fit(ScheduledModule(ranks, num_workers=0))
        return inside.path
    if case == "max_time":
        last = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
        timer = BatchClockTimer(seconds=7 + STOP_BATCH + 1)  # epoch 0 has 7 micro-batches
        module = ResumableModule(ranks, 0, stateful)
        make_trainer(ranks, [timer, last], mode, accumulate_grad_batches=k).fit(module)
        return tmp_path / "last.ckpt"
    if case == "max_steps":
        last = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
        make_trainer(ranks, [last], mode, accumulate_grad_batches=k, max_steps=6).fit(ResumableModule(ranks, 0))
        return tmp_path / "last.ckpt"
    # keyboard_interrupt, sigterm: the checkpoint that OnExceptionCheckpoint writes as the exception passes
    saved = OnExceptionCheckpoint(dirpath=tmp_path, filename="interrupted")
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        make_trainer(ranks, [StopAt(case), saved], mode, accumulate_grad_batches=k).fit(ResumableModule(ranks, 0))
    except SystemExit:  # Lightning exits after Ctrl+C; SIGTERMException is a SystemExit
        pass
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    return tmp_path / "interrupted.ckpt"


class CountBatches(pl.Callback):
    """Counts the training batches a fit runs."""

    batches = 0

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self.batches += 1


def resumed_fit(case: str, checkpoint: Path, ranks: int = 1, mode: str = "deferred") -> tuple[Tensor, int]:
    """Resume from ``checkpoint`` with a new Trainer to the end of epoch 2; the final parameters and the number of
    batches the resumed fit trained (1 process; 0 on ranks, whose count stays in the spawned processes)."""
    if not checkpoint.exists():
        raise FileNotFoundError(f"the stopped fit left no checkpoint at {checkpoint}")
    count = CountBatches()
    if case.startswith("scheduler"):
        module = ScheduledModule(ranks, num_workers=0)
        callbacks: list[pl.Callback] = [GradientAccumulationScheduler(SCHEDULE), count]
        trainer = make_trainer(ranks, callbacks, mode, reload_dataloaders_every_n_epochs=1)
    else:
        module = ResumableModule(ranks, num_workers=0)
        callbacks = [count, *([BatchClockTimer(seconds=1000)] if case == "max_time" else [])]
        trainer = make_trainer(ranks, callbacks, mode, accumulate_grad_batches=SPLITS[ranks][0])
    trainer.fit(module, ckpt_path=checkpoint)
    return flat_parameters(module.net), count.batches
