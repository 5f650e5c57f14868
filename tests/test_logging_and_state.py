"""Logged values equal the reference's window means; empty windows; checkpoint state and resume."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from cases import (
    CASES,
    Case,
    Cell,
    assert_logs_match,
    make_micro_batch,
    make_net,
    reference_distance,
    reference_run,
    varied_case,
)
from fits import CountingModule, ExactModule, fit, read_metrics
from lightning.pytorch.loggers import CSVLogger

from lightning_accum import SampleCountRescaler


def test_step_and_epoch_logs_are_global_item_means(tmp_path: Path) -> None:
    case = varied_case()
    logger = CSVLogger(tmp_path, name="run", version=0)
    fit(case, ExactModule(make_net(), case), [SampleCountRescaler()], logger=logger)
    assert_logs_match(read_metrics(logger), reference_run(case), windows_per_epoch=3)


DDP_LOGGED = Cell("masked_ranks", "deferred", "32-true", "spawn")


@pytest.mark.slow
@pytest.mark.cells(DDP_LOGGED.id)
def test_ddp_logs_are_not_inflated_by_world_size(shared_fits) -> None:
    # The matrix's two-rank fit (shared with test_exactness.py), logged by Lightning's CSVLogger on rank 0.
    case = CASES[DDP_LOGGED.case]()
    assert_logs_match(shared_fits.logs(DDP_LOGGED), reference_run(case), windows_per_epoch=3)


def test_empty_window_skips_the_update_and_keeps_optimizer_state() -> None:
    plan = [
        [
            make_micro_batch(n, seed=i, tokens=3, keep=0.0 if 2 <= i < 4 else 0.6)
            for i, n in enumerate([3, 2, 4, 1, 5, 2])
        ]
    ]
    case = Case(plan=plan, accumulation=2, epochs=2, optimizer="adamw", lr=0.05)  # window 2 of each epoch is empty
    module = ExactModule(make_net(), case)
    with pytest.warns(UserWarning, match="saw no counted items on any rank"):
        trainer = fit(case, module, [SampleCountRescaler()])
    adam_steps = {int(state["step"]) for state in trainer.optimizers[0].state.values()}
    assert adam_steps == {4}  # 6 windows, 2 of them empty
    assert reference_distance(case, module.net) <= 1e-5


def test_state_dict_round_trip_and_resume_match_an_uninterrupted_run(tmp_path: Path) -> None:
    case = varied_case(epochs=4)
    first = Case(plan=case.plan, accumulation=case.accumulation, epochs=2)
    module = ExactModule(make_net(), first)
    rescaler = SampleCountRescaler()
    trainer = fit(first, module, [rescaler])
    path = tmp_path / "two_epochs.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"][rescaler.state_key]
    first_count = float(case.plan[0][0][2].sum())  # the first micro-batch's count: the deferred loss's unit
    # At an epoch's end: the epoch's mean is logged (its totals start over), no window is open, the case's K was in
    # force and the fit ended at an epoch's end (no stop inside an epoch).
    assert saved == {
        "items_per_micro_batch": first_count,
        "epoch_loss_sum": 0.0,
        "epoch_items": 0.0,
        "window": None,
        "accumulate_grad_batches": case.accumulation,
        "stopped_inside_epoch": None,
    }

    restored = SampleCountRescaler()
    module.case = case
    fit(case, module, [restored], ckpt_path=path)
    assert restored.state_dict()["items_per_micro_batch"] == first_count  # kept, not recounted at resume
    assert reference_distance(case, module.net) <= 1e-5


class StopInsideWindow(pl.Callback):
    """Stops the fit after micro-batch 1 of 3 of the first window (the window never reaches its step)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == 1:
            trainer.should_stop = True


@pytest.mark.parametrize("mode", ["deferred", "lookahead"])
def test_a_second_fit_forgets_the_partial_window_of_a_stopped_one(mode: str, measured) -> None:
    case = Case(plan=[[make_micro_batch(n, seed=i, tokens=3, keep=0.6) for i, n in enumerate([7, 1, 4, 2, 6])]],
                accumulation=3, epochs=2)  # fmt: skip
    rescaler = SampleCountRescaler(mode=mode)
    fit(case, CountingModule(make_net(), case), [rescaler, StopInsideWindow()])
    module = CountingModule(make_net(), case)
    fit(case, module, [rescaler])  # the same callback object, a fresh model
    assert measured(reference_distance(case, module.net)) <= 1e-5
