"""Logged values equal the reference's window means; empty windows; checkpoint state and resume."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from cases import (
    Case,
    assert_logs_match,
    make_micro_batch,
    make_net,
    masked_ranks_case,
    reference_distance,
    reference_run,
    varied_case,
)
from fits import QUIET_TRAINER, CountingModule, ExactModule, fit, fit_case, read_metrics
from lightning.pytorch.loggers import CSVLogger
from reference import flat_parameters, relative_distance

from lightning_accum import SampleCountRescaler


def test_step_and_epoch_logs_are_global_item_means(tmp_path: Path) -> None:
    case = varied_case()
    logger = CSVLogger(tmp_path, name="run", version=0)
    fit_case(case, exact=True, logger=logger)
    assert_logs_match(read_metrics(logger), reference_run(case), windows_per_epoch=3)


@pytest.mark.slow
def test_ddp_logs_are_not_inflated_by_world_size(tmp_path: Path) -> None:
    case = masked_ranks_case()
    logger = CSVLogger(tmp_path, name="run", version=0)
    fit_case(case, exact=True, strategy="ddp_spawn", devices=2, logger=logger)
    assert_logs_match(read_metrics(logger), reference_run(case), windows_per_epoch=3)


def test_empty_window_skips_the_update_and_keeps_optimizer_state() -> None:
    plan = [
        [
            make_micro_batch(n, seed=i, tokens=3, keep=0.0 if 2 <= i < 4 else 0.6)
            for i, n in enumerate([3, 2, 4, 1, 5, 2])
        ]
    ]
    case = Case(plan=plan, accumulation=2, epochs=2, optimizer="adamw", lr=0.05)  # window 2 of each epoch is empty
    trainer_net = make_net()
    module = ExactModule(trainer_net, case)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=case.epochs, accumulate_grad_batches=2, callbacks=[SampleCountRescaler()],
        **QUIET_TRAINER,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="saw no counted items on any rank"):
        trainer.fit(module)
    adam_steps = {int(state["step"]) for state in trainer.optimizers[0].state.values()}
    assert adam_steps == {4}  # 6 windows, 2 of them empty
    reference = reference_run(case)
    assert relative_distance(flat_parameters(trainer_net), reference.parameters, flat_parameters(make_net())) <= 1e-5


def test_state_dict_round_trip_and_resume_match_an_uninterrupted_run(tmp_path: Path) -> None:
    case = varied_case(epochs=4)
    first = Case(plan=case.plan, accumulation=case.accumulation, epochs=2)
    module = ExactModule(make_net(), first)
    kwargs = dict(accelerator="cpu", accumulate_grad_batches=3, **QUIET_TRAINER)
    rescaler = SampleCountRescaler()
    trainer = pl.Trainer(max_epochs=2, callbacks=[rescaler], **kwargs)
    trainer.fit(module)
    path = tmp_path / "two_epochs.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"][rescaler.state_key]
    assert saved == rescaler.state_dict()
    assert saved["items_per_micro_batch"] == case.plan[0][0][2].sum().item()  # the first micro-batch's count

    restored = SampleCountRescaler()
    module.case = case
    pl.Trainer(max_epochs=4, callbacks=[restored], **kwargs).fit(module, ckpt_path=path)
    assert restored.state_dict()["items_per_micro_batch"] == saved["items_per_micro_batch"]
    reference = reference_run(case)
    assert relative_distance(flat_parameters(module.net), reference.parameters, flat_parameters(make_net())) <= 1e-5


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
