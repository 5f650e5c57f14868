"""A resumed fit continues where the checkpoint says training stopped, or refuses with what it would skip.

A checkpoint records what was trained: the train loader's position (``GlobalBatchLoader``: epoch and
micro-batches delivered), the partial window it carried (``resume.py``), the K in force, and, when a stop
(``Trainer(max_time=...)``, ``max_steps``, ``should_stop``) ended an epoch early, that epoch and how many of its
batches ran. Lightning saves such an epoch as done and resumes at the next one; with a loader that saved its
position the epoch is reopened (``lightning_internals.reopen_epoch``), otherwise the resume is refused. At
train start and at the first resumed batch, what Lightning is about to run is compared with the record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_accum.data.checks import require_window_split
from lightning_accum.data.loader import continue_loop_counters
from lightning_accum.engines import WeightingEngine
from lightning_accum.lightning_internals import (
    epoch_cut_short,
    reopen_epoch,
    resume_point,
    resumed_mid_epoch,
    saved_loader_states,
    scheduled_accumulation,
)
from lightning_accum.resume import restore_partial_window
from lightning_accum.run import Run

_FIX = (
    "Train with GlobalBatchLoader(dataset, GlobalBatchSampler(...)), whose position lets the rescaler continue the "
    "epoch, or resume from a checkpoint saved at an epoch's end."
)


def micro_batches(first: int, end: int, epoch: int, in_epoch: int) -> str:
    """Name the micro-batches ``first .. end - 1`` of ``epoch``.

    Examples:
        >>> micro_batches(3, 7, epoch=1, in_epoch=7)
        'micro-batches 3..6 of epoch 1 (4 of its 7)'
        >>> micro_batches(3, 4, epoch=1, in_epoch=7)
        'micro-batch 3 of epoch 1 (1 of its 7)'
    """
    which = f"micro-batch {first}" if end - first == 1 else f"micro-batches {first}..{end - 1}"
    return f"{which} of epoch {epoch} ({end - first} of its {in_epoch})"


def _position(state: Any) -> tuple[int, int] | None:
    """``(epoch, micro-batches delivered)`` of a saved ``GlobalBatchLoader`` state, else None."""
    if isinstance(state, dict) and "epoch" in state and "micro_batches" in state:
        return int(state["epoch"]), int(state["micro_batches"])
    return None


def _misplaced(saved_epoch: int, delivered: int, epoch: int, batch: int, in_epoch: int) -> str:
    """The refusal when Lightning would resume at ``(epoch, batch)`` after the loader delivered ``delivered``."""
    fix = (
        "Resume with the Trainer settings of the saved fit (max_steps, accumulate_grad_batches, "
        "limit_train_batches), or from a checkpoint saved at an epoch's end."
    )
    if epoch == saved_epoch and batch < delivered:
        lost = f"{micro_batches(batch, delivered, epoch, in_epoch)}, read ahead but never trained, would be skipped"
        fix = (
            "In look-ahead mode, which reads a window's batches at its start, save checkpoints at optimizer-step "
            "boundaries (ModelCheckpoint(every_n_train_steps=...)), or use the default mode (mode='deferred')."
        )
    elif epoch == saved_epoch:
        lost = f"{micro_batches(delivered, batch, epoch, in_epoch)} would be skipped"
    elif epoch > saved_epoch:
        lost = f"{micro_batches(delivered, in_epoch, saved_epoch, in_epoch)} would be skipped"
    else:
        lost = f"epoch {epoch} would be trained again"
    return (
        f"This resume would not continue where the checkpoint stopped: its train loader had delivered {delivered} "
        f"micro-batches of epoch {saved_epoch}, but Lightning is about to train epoch {epoch} from batch {batch}, so "
        f"{lost}. {fix}"
    )


class Continuation:
    """The rescaler's record of what a checkpoint trained, saved with its state and checked at resume.

    Examples:
        >>> continuation = Continuation()
        >>> continuation.load({"loops": {}}, {"accumulate_grad_batches": 2, "stopped_inside_epoch": None})
        >>> continuation.saved_k
        2
    """

    def __init__(self) -> None:
        self.position: tuple[int, int] | None = None  # the train loader's saved (epoch, micro-batches delivered)
        self.saved_k: int | None = None  # the K in force when the checkpoint was saved
        self.carries_window = False  # the checkpoint holds a window's first micro-batches
        self._mid_epoch = False  # Lightning resumes inside an epoch (its on_train_epoch_start is skipped)
        self._stopped: tuple[int, int, int] | None = None  # the fit that just ended stopped inside this epoch
        self.window: dict[str, Any] | None = None  # a mid-window checkpoint's window (resume.py), until train start

    # ---------------------------------------------------------------- the fit that stops

    def state_dict(self, trainer: pl.Trainer | None, accumulate_grad_batches: int) -> dict[str, Any]:
        """The K in force and, after a stop inside an epoch, ``(epoch, batches run, batches in the epoch)``."""
        stopped = self._stopped if trainer is None else epoch_cut_short(trainer)
        return {"accumulate_grad_batches": accumulate_grad_batches, "stopped_inside_epoch": stopped}

    def fit_ended(self, trainer: pl.Trainer) -> None:
        """Keep whether the fit stopped inside an epoch, for a checkpoint saved after ``fit`` returns."""
        self._stopped = epoch_cut_short(trainer)

    # ---------------------------------------------------------------- the fit that resumes

    def load(self, checkpoint: dict[str, Any], state: dict[str, Any]) -> None:
        """Read the record from ``checkpoint`` (the rescaler's ``state``); reopen an epoch a stop cut short.

        Called before Lightning restores its loops. Raises when the epoch cannot be continued.
        """
        loaders = saved_loader_states(checkpoint)
        positions = [_position(saved) for saved in loaders]
        self.position = positions[0] if positions and None not in positions else None
        self.saved_k = state.get("accumulate_grad_batches")
        self.carries_window = state.get("window") is not None
        stopped = state.get("stopped_inside_epoch")
        if stopped is None:
            return
        epoch, batches, in_epoch = stopped
        if self.position == (epoch, batches) and len(set(positions)) == 1:
            reopen_epoch(checkpoint)  # Lightning restarts inside the epoch and restores the loader's position
            return
        if self.position is None:
            why, fix = "the train loader saved no position inside it to continue from", _FIX
        else:
            why = (
                f"the train loader's saved position ({self.position[1]} micro-batches of epoch {self.position[0]} "
                f"delivered) is not the {batches} that trained (look-ahead mode reads a window's batches at its start)"
            )
            fix = (
                "Stop inside a window only in the default mode (mode='deferred'), whose checkpoint carries the window."
            )
        raise RuntimeError(
            f"Resuming this checkpoint would skip {micro_batches(batches, in_epoch, epoch, in_epoch)}: the fit "
            f"stopped inside epoch {epoch} (Trainer(max_time=...), max_steps or should_stop), Lightning saved the "
            f"epoch as done, and {why}. {fix}"
        )

    def start_fit(self, trainer: pl.Trainer, engine: WeightingEngine, params: Sequence[torch.nn.Parameter]) -> None:
        """At ``on_train_start``: move Lightning's counters to a loader resumed under another split, check that
        Lightning continues at the saved position, and put back the window the checkpoint carried."""
        self.check_start(trainer, continue_loop_counters(trainer))
        window, self.window = self.window, None
        if window is not None:
            restore_partial_window(window, trainer, engine, params)

    def start_batch(self, trainer: pl.Trainer, run: Run, batch_idx: int, first: bool) -> None:
        """At each training batch: the resumed fit's K at its first batch (``check_first_batch``), the run's K
        (a schedule changes it at epoch starts), and the window sampler's split wherever a window starts."""
        if first:
            self.check_first_batch(trainer, run.automatic)
        if not run.automatic:
            return
        run.accumulate_grad_batches = trainer.accumulate_grad_batches
        if first or batch_idx % run.accumulate_grad_batches == 0:
            require_window_split(
                trainer.train_dataloader, run.accumulate_grad_batches, run.world_size, trainer.global_rank
            )

    def check_start(self, trainer: pl.Trainer, resplit: tuple[int, int] | None = None) -> None:
        """At ``on_train_start`` of a resumed fit: raise unless Lightning continues at the saved position.

        ``resplit``: the (saved, resumed) micro-batches of a loader resumed under another split (the same steps in
        the resumed split's micro-batches, where a K of its own is in force).
        """
        if resplit is not None and self.position is not None:
            self.position, self.saved_k = (self.position[0], resplit[1]), None
        self._mid_epoch = resumed_mid_epoch(trainer)
        epoch, batch = resume_point(trainer)
        in_epoch = trainer.num_training_batches
        if self.position is not None:
            saved_epoch, delivered = self.position
            expected = (saved_epoch, delivered) if delivered < in_epoch else (saved_epoch + 1, 0)
            if (epoch, batch) != expected:
                raise RuntimeError(_misplaced(saved_epoch, delivered, epoch, batch, int(in_epoch)))
        if self.carries_window and self.saved_k is not None and (not self._mid_epoch or batch % self.saved_k == 0):
            raise RuntimeError(
                f"The checkpoint carries the first micro-batches of an accumulation window (K={self.saved_k}), but "
                f"Lightning resumes at batch {batch} of epoch {epoch}, a window's start, and would drop them. "
                "Resume from a checkpoint saved at an optimizer-step boundary (ModelCheckpoint(every_n_train_steps=...)"
                " or an epoch's end), or with the Trainer settings of the saved fit."
            )

    def check_first_batch(self, trainer: pl.Trainer, automatic: bool) -> None:
        """At a resumed fit's first batch: apply a schedule's K inside the epoch, and require the saved K.

        Lightning skips ``on_train_epoch_start`` (where ``GradientAccumulationScheduler`` sets K) when it resumes
        inside an epoch; the schedule's K for the resumed epoch is set here, before the batch's backward.
        """
        if not (self._mid_epoch and automatic):
            return
        scheduled = scheduled_accumulation(trainer)
        if scheduled is not None:
            trainer.accumulate_grad_batches = scheduled
        if self.saved_k is not None and trainer.accumulate_grad_batches != self.saved_k:
            raise RuntimeError(
                f"The checkpoint was saved inside epoch {trainer.current_epoch} with K={self.saved_k} in force, but "
                f"this fit resumes it with Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}): the "
                f"rest of the epoch would be cut into other windows. Resume with "
                f"accumulate_grad_batches={self.saved_k} (or the GradientAccumulationScheduler of the saved fit)."
            )
