"""Stops and resumes that Lightning's own loop state gets wrong: each continues exactly, or refuses at resume.

Every fit stops inside epoch 1 of 3 (``stops_fits``) and a new Trainer resumes it from the checkpoint that stop
path leaves; the final parameters must equal plain PyTorch that never stopped. Before the rescaler recorded
what a checkpoint trained, a ``GradientAccumulationScheduler`` resumed inside an epoch ran K=1 against windows of
K=3 (0.38 of the update off) and a stop by ``max_time`` or ``max_steps`` skipped the rest of the epoch (0.43,
0.35), all silently; Ctrl+C and SIGTERM already resumed inside the epoch.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from rank_jobs import TWO_RANK_STOPS
from reference import relative_distance
from stops_fits import ResumableModule, ScheduledModule, first_fit, make_trainer, resumed_fit, uninterrupted

EXACT = [
    ("scheduler_killed", 1, "deferred"),
    ("scheduler_inside_window", 1, "deferred"),
    ("max_time", 1, "deferred"),
    ("max_steps", 1, "deferred"),
    ("keyboard_interrupt", 1, "deferred"),
    ("sigterm", 1, "deferred"),
    pytest.param("scheduler_killed", 1, "lookahead", marks=pytest.mark.slow),
    *(  # fitted in rank_runs' one launch of two ranks (rank_jobs.JOBS)
        pytest.param(case, 2, "deferred", marks=[pytest.mark.slow, pytest.mark.two_ranks(f"stop-{case}")])
        for case in TWO_RANK_STOPS
    ),
]


@pytest.mark.parametrize(("case", "ranks", "mode"), EXACT)
def test_resume_after_a_stop_continues_exactly(
    tmp_path: Path, measured, two_rank_runs, case: str, ranks: int, mode: str
) -> None:
    if ranks == 2:
        assert mode == "deferred"
        parameters = two_rank_runs[f"stop-{case}"]["parameters"]
    else:
        checkpoint = first_fit(case, tmp_path, ranks, mode)
        parameters, batches = resumed_fit(case, checkpoint, ranks, mode)
    initial, final = uninterrupted(scheduled=case.startswith("scheduler"))
    distance = relative_distance(parameters, final, initial)
    assert measured(distance) < 1e-5, f"resumed run is {distance:.2e} of the update away from the reference"
    if ranks == 1:  # 3 epochs of 7 micro-batches; the stop came after 10 of them (max_steps=6: 11; inside K=3: 12)
        assert batches == 21 - {"max_steps": 11, "scheduler_inside_window": 12}.get(case, 10)


def test_max_time_inside_a_window_with_a_plain_loader_is_refused(tmp_path: Path) -> None:
    """A plain DataLoader saves no position: the rest of epoch 1 cannot be continued, so the resume refuses."""
    checkpoint = first_fit("max_time", tmp_path, stateful=False)
    with pytest.raises(
        RuntimeError, match=r"would skip micro-batches 3\.\.6 of epoch 1 \(4 of its 7\).*GlobalBatchLoader"
    ):
        make_trainer(1, [], accumulate_grad_batches=2).fit(ResumableModule(1, 0, stateful=False), ckpt_path=checkpoint)


def test_max_time_inside_a_window_in_lookahead_mode_is_refused(tmp_path: Path) -> None:
    """The epoch reopens inside a window, whose look-ahead count cannot be rebuilt: refused at the resumed batch."""
    checkpoint = first_fit("max_time", tmp_path, mode="lookahead")
    ahead = r"skip micro-batches 3\.\.6 of epoch 1.*position \(4 micro-batches of epoch 1 delivered\) is not the 3"
    with pytest.raises(RuntimeError, match=ahead):
        resumed_fit("max_time", checkpoint, mode="lookahead")


@pytest.mark.parametrize(
    ("stateful", "refusal"),
    [
        (True, r"delivered 3 micro-batches of epoch 1.*micro-batches 3\.\.6 of epoch 1"),
        (False, r"carries the first micro-batches of an accumulation window \(K=2\).*batch 0 of epoch 2"),
    ],
    ids=["loader_position", "plain_loader_window"],
)
def test_resume_past_the_saved_position_is_refused(tmp_path: Path, stateful: bool, refusal: str) -> None:
    """Without the rescaler's record of the stop (a checkpoint of an earlier version), Lightning would start epoch
    2: the loader's saved position (3 micro-batches into epoch 1) or, with a plain loader, the window the checkpoint
    carries (its first micro-batch) says what would be lost, and the comparison at train start refuses."""
    checkpoint = first_fit("max_time", tmp_path, stateful=stateful)
    saved = torch.load(checkpoint, weights_only=False)
    for key, state in saved["callbacks"].items():
        if key.startswith("SampleCountRescaler"):
            del state["stopped_inside_epoch"]
    torch.save(saved, checkpoint)
    trainer = make_trainer(1, [], accumulate_grad_batches=2)
    with pytest.raises(RuntimeError, match=refusal):
        trainer.fit(ResumableModule(1, 0, stateful=stateful), ckpt_path=checkpoint)


def test_ctrl_c_inside_a_window_in_lookahead_mode_is_refused(tmp_path: Path) -> None:
    """Look-ahead read batch 3 (the window's second) before Ctrl+C came after batch 2: the loader continues at 4."""
    checkpoint = first_fit("keyboard_interrupt", tmp_path, mode="lookahead")
    read_ahead = r"micro-batch 3 of epoch 1 \(1 of its 7\), read ahead but never trained, would be skipped"
    with pytest.raises(RuntimeError, match=read_ahead):
        resumed_fit("keyboard_interrupt", checkpoint, mode="lookahead")


def test_resuming_inside_an_epoch_with_another_k_is_refused(tmp_path: Path) -> None:
    """The scheduled fit's checkpoint (K=3 in epoch 1) resumed by a Trainer without the schedule (K=2)."""
    checkpoint = first_fit("scheduler_killed", tmp_path)
    trainer = make_trainer(1, [], accumulate_grad_batches=2, reload_dataloaders_every_n_epochs=1)
    with pytest.raises(RuntimeError, match=r"saved inside epoch 1 with K=3 in force.*accumulate_grad_batches=2"):
        trainer.fit(ScheduledModule(1, num_workers=0), ckpt_path=checkpoint)


class ChangeK(pl.Callback):
    """Sets the Trainer's K to 4 after batch 3 of epoch 0 (a step), as a schedule of the user's own might."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == 3:
            trainer.accumulate_grad_batches = 4


def test_the_window_sampler_is_checked_wherever_a_window_starts() -> None:
    """The sampler was built for K=2; a K of 4 from batch 4 on is refused there, not only at an epoch's batch 0."""
    trainer = make_trainer(1, [ChangeK()], accumulate_grad_batches=2)
    with pytest.raises(ValueError, match=r"built for K=2 on 1 rank.*the Trainer runs K=4"):
        trainer.fit(ResumableModule(1, 0))
    assert trainer.global_step == 2  # the two windows before batch 4
