"""Look-ahead mode's own behaviour: loaders it reads ahead of, a cut last window, its count rule, its refusals.

Its exactness across cases, precisions and strategies is in the matrix (``test_exactness.py``)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from cases import (
    EXACT_TOLERANCE,
    Case,
    assert_logs_match,
    count_case_items,
    empty_windows_case,
    make_net,
    reference_distance,
    reference_run,
    varied_sizes_plan,
)
from fits import CountingModule, fit, read_metrics
from lightning.pytorch.loggers import CSVLogger
from reference import item_losses
from torch.utils.data import DataLoader, IterableDataset

from lightning_accum import SampleCountRescaler


class PlanStream(IterableDataset):
    """The plan as an iterable without a length: Lightning then prefetches a batch ahead itself."""

    def __init__(self, plan: list) -> None:
        self.plan = plan

    def __iter__(self):
        return iter(self.plan)


class StreamModule(CountingModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(PlanStream(self.case.plan[self.trainer.global_rank]), batch_size=None)


def test_unsized_loader_that_lightning_prefetches() -> None:
    case = Case(plan=varied_sizes_plan(tokens=3, keep=0.6), accumulation=3, epochs=3)
    module = StreamModule(make_net(), case)
    fit(case, module, [SampleCountRescaler(mode="lookahead")])
    assert reference_distance(case, module.net) <= EXACT_TOLERANCE


def test_limit_train_batches_cuts_the_last_window() -> None:
    case = Case(plan=varied_sizes_plan(), accumulation=3, epochs=2)
    limited = Case(plan=[case.plan[0][:5]], accumulation=3, epochs=2)  # windows of 3 + 2 batches
    module = CountingModule(make_net(), case)
    fit(case, module, [SampleCountRescaler(mode="lookahead")], limit_train_batches=5)
    assert reference_distance(limited, module.net) <= EXACT_TOLERANCE


def test_count_function_passed_to_the_callback_and_logs(tmp_path: Path) -> None:
    case = Case(plan=varied_sizes_plan(tokens=3, keep=0.6), accumulation=3, epochs=2)
    module = CountingModule(make_net(), case)
    module.count_items = None  # the callback's function must be the one used
    logger = CSVLogger(tmp_path, name="run", version=0)
    fit(case, module, [SampleCountRescaler(mode="lookahead", count_items=count_case_items)], logger=logger)
    assert reference_distance(case, module.net) <= EXACT_TOLERANCE
    assert_logs_match(read_metrics(logger), reference_run(case), windows_per_epoch=3)


def test_empty_window_leaves_optimizer_state_untouched() -> None:
    case = empty_windows_case()  # window 2 of each epoch is empty
    module = CountingModule(make_net(), case)
    with pytest.warns(UserWarning, match="saw no counted items"):
        trainer = fit(case, module, [SampleCountRescaler(mode="lookahead")])
    assert {int(s["step"]) for s in trainer.optimizers[0].state.values()} == {4}  # 6 windows, 2 empty
    assert reference_distance(case, module.net) <= EXACT_TOLERANCE


class SaveMidWindowAndStop(pl.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == 1:  # K=3: the first window is two batches in
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def test_resume_from_a_mid_window_checkpoint_fails_with_the_fix(tmp_path: Path) -> None:
    case = Case(plan=varied_sizes_plan(), accumulation=3, epochs=1)
    stop = SaveMidWindowAndStop(tmp_path / "mid_window.ckpt")
    fit(case, CountingModule(make_net(), case), [SampleCountRescaler(mode="lookahead"), stop])
    resumed = CountingModule(make_net(), case)
    with pytest.raises(RuntimeError, match=r"cannot start in the middle of a window \(batch 2, K=3\).*every_n_train"):
        fit(case, resumed, [SampleCountRescaler(mode="lookahead")], ckpt_path=stop.path)


class DriftingCountModule(CountingModule):
    def count_items(self, batch) -> torch.Tensor:
        return torch.tensor(batch[1].numel())  # ignores the mask that the loss uses


def test_count_rule_that_drifts_from_the_loss_mask_fails() -> None:
    case = Case(plan=varied_sizes_plan(tokens=3, keep=0.6), accumulation=3, epochs=1)
    with pytest.raises(RuntimeError, match=r"count_items counted \d+ items .* sample_loss masks counted \d+"):
        fit(case, DriftingCountModule(make_net(), case), [SampleCountRescaler(mode="lookahead")])


class NoCountModule(CountingModule):
    count_items = CountingModule.__mro__[2].count_items  # the mixin's default


def test_missing_count_rule_fails_with_both_ways_to_give_it() -> None:
    case = Case(plan=varied_sizes_plan(), accumulation=2, epochs=1)
    with pytest.raises(NotImplementedError, match=r"count_items\(batch\).*SampleCountRescaler\(count_items=...\)"):
        fit(case, NoCountModule(make_net(), case), [SampleCountRescaler(mode="lookahead")])


class IterStepModule(CountingModule):
    def training_step(self, dataloader_iter) -> torch.Tensor:
        batch = next(dataloader_iter)
        return self.sample_loss(item_losses(self.net, batch)[0], mask=batch[2])


def test_training_step_with_dataloader_iter_fails() -> None:
    case = Case(plan=varied_sizes_plan(), accumulation=2, epochs=1)
    with pytest.raises(RuntimeError, match=r"cannot read ahead.*dataloader_iter.*default mode"):
        fit(case, IterStepModule(make_net(), case), [SampleCountRescaler(mode="lookahead")])


def test_constructor_arguments() -> None:
    with pytest.raises(ValueError, match=r"`mode` must be one of \('deferred', 'lookahead'\), got 'ahead'"):
        SampleCountRescaler(mode="ahead")
    with pytest.raises(ValueError, match="only used with mode='lookahead'"):
        SampleCountRescaler(count_items=count_case_items)
