"""Ordinary Lightning control flow keeps the window's counts equal to what its gradients hold, or fails loudly.

Items count when a backward pass carries them and are forgotten when Lightning zeroes the gradients. Each
test runs what a user writes and compares the final parameters with a plain-PyTorch reference over the
micro-batches that really reached a backward (``cases.masked_out`` marks the others).
"""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from cases import EXACT_TOLERANCE, Case, make_micro_batch, make_net, masked_out, reference_distance, varied_sizes_plan
from fits import CountingModule, ManualModule, fit
from lightning.pytorch.tuner import Tuner
from reference import MicroBatch, item_losses, merge_ranks, split_into_windows
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_accum import SampleCountRescaler

MODES = ["deferred", "lookahead"]


def case_k3(epochs: int = 2, **kwargs) -> Case:
    """One rank, 7 micro-batches of 7, 1, 4, 2, 6, 1, 3 samples x 3 tokens, K=3: windows of 3, 3 and 1."""
    return Case(plan=varied_sizes_plan(tokens=3, keep=0.6), accumulation=3, epochs=epochs, **kwargs)


def windows_without(case: Case, dropped: set[int]) -> list[list[MicroBatch]]:
    """The case's reference windows, with the micro-batches at these indices of every epoch counting nothing."""
    plan = [[masked_out(mb) if i in dropped else mb for i, mb in enumerate(case.plan[0])]]
    return Case(plan=plan, accumulation=case.accumulation, epochs=case.epochs).reference_windows()


# ---------------------------------------------------------------- 1. return None after sample_loss


class SkippingModule(CountingModule):
    """Computes ``sample_loss`` for every batch, then skips some with Lightning's ``return None``."""

    skipped = (1, 4)

    def training_step(self, batch: MicroBatch, batch_idx: int) -> torch.Tensor | None:
        loss = self.sample_loss(*item_losses(self.net, batch)[:1], mask=batch[2])
        return None if batch_idx in self.skipped else loss


class NonFiniteGuardModule(CountingModule):
    """The usual guard: a micro-batch whose loss is not finite is skipped (here batches 2 and 5 hold a nan)."""

    poisoned = (2, 5)

    def training_step(self, batch: MicroBatch, batch_idx: int) -> torch.Tensor | None:
        losses, _ = item_losses(self.net, batch)
        if batch_idx in self.poisoned:
            losses = losses + float("nan")
        loss = self.sample_loss(losses, mask=batch[2])
        if not torch.isfinite(loss):
            return None
        return loss


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("module_class", "dropped"), [(SkippingModule, {1, 4}), (NonFiniteGuardModule, {2, 5})])
def test_skipped_batches_count_nothing(module_class, dropped: set[int], mode: str, measured) -> None:
    case = case_k3()
    module = module_class(make_net(), case)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*training_step` returned `None`")
        fit(case, module, [SampleCountRescaler(mode=mode)])
    distance = reference_distance(case, module.net, windows=windows_without(case, dropped))
    assert measured(distance) <= EXACT_TOLERANCE


# ---------------------------------------------------------------- 2. sample_loss outside the backward path


class LogsSampleLossModule(CountingModule):
    """Also logs ``sample_loss`` of the batch in ``on_train_batch_end``, with gradients enabled."""

    def on_train_batch_end(self, outputs, batch: MicroBatch, batch_idx: int) -> None:
        losses, _ = item_losses(self.net, batch)
        self.log("train/again", self.sample_loss(losses, mask=batch[2]).detach(), batch_size=1)


@pytest.mark.parametrize("mode", MODES)
def test_sample_loss_for_logging_counts_nothing(mode: str, measured) -> None:
    case = case_k3()
    module = LogsSampleLossModule(make_net(), case)
    fit(case, module, [SampleCountRescaler(mode=mode)])
    assert measured(reference_distance(case, module.net)) <= EXACT_TOLERANCE


class LogsUnderNoGradModule(CountingModule):
    """Logs a second ``sample_loss`` of the batch computed under ``torch.no_grad()`` inside ``training_step``."""

    def training_step(self, batch: MicroBatch, batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            self.log("train/no_grad", self.sample_loss(item_losses(self.net, batch)[0] * 2, mask=batch[2]))
        return self.sample_loss(item_losses(self.net, batch)[0], mask=batch[2])


@pytest.mark.parametrize("mode", MODES)
def test_sample_loss_under_no_grad_for_logging_counts_nothing(mode: str, measured) -> None:
    case = case_k3()
    module = LogsUnderNoGradModule(make_net(), case)
    fit(case, module, [SampleCountRescaler(mode=mode)])
    assert measured(reference_distance(case, module.net)) <= EXACT_TOLERANCE


# ---------------------------------------------------------------- 3. on_train_batch_start returns -1


class EndsFirstEpochEarlyModule(CountingModule):
    """Ends epoch 0 at batch 4, one micro-batch into its second window (Lightning's documented -1)."""

    def on_train_batch_start(self, batch: MicroBatch, batch_idx: int) -> int | None:
        return -1 if self.current_epoch == 0 and batch_idx == 4 else None


@pytest.mark.parametrize("mode", MODES)
def test_epoch_ended_inside_a_window_drops_that_window(mode: str, measured) -> None:
    case = case_k3()
    module = EndsFirstEpochEarlyModule(make_net(), case)
    fit(case, module, [SampleCountRescaler(mode=mode)])
    plan = case.plan[0]
    # Epoch 0 steps once on batches 0-2; batch 3's gradient is zeroed at epoch 1's first batch. Epoch 1 is whole.
    windows = [plan[0:3], *merge_ranks([split_into_windows(plan, 3)])]
    assert measured(reference_distance(case, module.net, windows=windows)) <= EXACT_TOLERANCE


# ---------------------------------------------------------------- 4. an IterableDataset whose len overstates


class OverstatedStream(IterableDataset):
    """Yields the plan's micro-batches but says it holds two more."""

    def __init__(self, plan: list[MicroBatch]) -> None:
        self.plan = plan

    def __iter__(self):
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan) + 2


class OverstatedStreamModule(CountingModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(OverstatedStream(self.case.plan[0]), batch_size=None)


@pytest.mark.parametrize("mode", MODES)
def test_stream_that_ends_early_drops_its_unfinished_window(mode: str, measured) -> None:
    case = case_k3()
    module = OverstatedStreamModule(make_net(), case)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__")
        fit(case, module, [SampleCountRescaler(mode=mode)])
    plan = case.plan[0]
    # Lightning expects 9 batches: after batch 6 it does not step (the window has 2 more to come), and the data
    # ends; batch 6's gradient is zeroed at the next epoch's first batch.
    windows = [plan[0:3], plan[3:6]] * case.epochs
    assert measured(reference_distance(case, module.net, windows=windows)) <= EXACT_TOLERANCE


# ---------------------------------------------------------------- 5. ranks with different numbers of batches


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sizes", "k"), [((5, 4), 2), ((4, 3), 1), ((5, 4), 3)], ids=["K2-steps-differ", "K1-steps-differ", "K3-same-steps"]
)
def test_ranks_with_different_batch_counts_fail_on_every_rank(tmp_path: Path, sizes, k: int, measured) -> None:
    # K=3 with 5 and 4 batches steps twice on both ranks, yet plain Lightning hangs there at the epoch's end too.
    script = Path(__file__).with_name("ddp_uneven_fit.py")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(script), str(sizes[0]), str(sizes[1]), str(k), str(tmp_path)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    measured(time.monotonic() - start, "seconds until every rank failed")
    assert proc.returncode != 0
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "ranks ran different numbers of batches" in message and "GlobalBatchSampler" in message, message


# ---------------------------------------------------------------- 6. DistributedSampler repeats samples


class RecordWarnings(pl.Callback):
    """Appends every warning a rank shows from setup on to ``folder/warnings<R>.txt``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        path = self.folder / f"warnings{trainer.global_rank}.txt"
        warnings.simplefilter("always")

        def record(message, category, filename, lineno, file=None, line=None) -> None:
            with path.open("a") as f:
                f.write(f"{category.__name__}: {message}\n")

        warnings.showwarning = record


class PlainLoaderModule(CountingModule):
    """Trains on a plain DataLoader over 7 samples: Lightning injects a DistributedSampler under DDP."""

    def train_dataloader(self) -> DataLoader:
        x, y, _ = make_micro_batch(7, seed=0)
        return DataLoader(TensorDataset(x, y), batch_size=2)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.sample_loss(*item_losses(self.net, (x, y, None))[:1])


@pytest.mark.slow
def test_distributed_sampler_repeats_are_reported_with_the_fix(tmp_path: Path) -> None:
    case = Case(plan=[[], []], epochs=1)
    pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[SampleCountRescaler(), RecordWarnings(tmp_path)],
    ).fit(PlainLoaderModule(make_net(), case))  # fmt: skip
    shown = (tmp_path / "warnings0.txt").read_text()
    assert "DistributedSampler repeats 1 of the 7 training samples" in shown and "GlobalBatchLoader" in shown
    assert "repeats" not in (tmp_path / "warnings1.txt").read_text()  # rank 0 speaks for all


# ---------------------------------------------------------------- 7. a callback before the rescaler clips


class ClipInCallback(pl.Callback):
    """A user's clipping callback, in on_before_optimizer_step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        torch.nn.utils.clip_grad_norm_(pl_module.parameters(), 0.5)


@pytest.mark.parametrize("mode", MODES)
def test_callbacks_before_the_rescaler_see_the_exact_gradient(mode: str, measured) -> None:
    case = case_k3(clip_norm=0.5)  # the reference clips; the Trainer does not, the user's callback does
    module = CountingModule(make_net(), case)
    fit(case, module, [ClipInCallback(), SampleCountRescaler(mode=mode)], gradient_clip_val=None)
    assert measured(reference_distance(case, module.net)) <= EXACT_TOLERANCE


# ---------------------------------------------------------------- 12. sums and uniform factors in any spelling


class SpelledModule(CountingModule):
    """Returns two halves' sample_loss outputs combined as ``spelling`` (every one a plain sum, maybe times 2)."""

    def __init__(self, net: torch.nn.Module, case: Case, spelling: str) -> None:
        super().__init__(net, case)
        self.spelling = spelling

    def training_step(self, batch: MicroBatch, batch_idx: int) -> torch.Tensor:
        losses, _ = item_losses(self.net, batch)
        mask = torch.ones_like(losses, dtype=torch.bool) if batch[2] is None else batch[2]
        half = max(1, len(losses) // 2)
        a, b = self.sample_loss(losses[:half], mask[:half]), self.sample_loss(losses[half:], mask[half:])
        return {
            "tensor_factor": lambda: torch.tensor(2.0) * (a + b),
            "stack_sum": lambda: torch.stack([a, b]).sum(),
            "clone": lambda: (a + b).clone(),
            "builtin_sum": lambda: sum([a, b]),
        }[self.spelling]()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spelling", ["tensor_factor", "stack_sum", "clone", "builtin_sum"])
def test_plain_sums_and_uniform_factors_in_any_spelling_are_exact(spelling: str, mode: str, measured) -> None:
    case = case_k3()
    module = SpelledModule(make_net(), case, spelling)
    fit(case, module, [SampleCountRescaler(mode=mode)])
    factor = 2.0 if spelling == "tensor_factor" else 1.0
    reference = case_k3(lr=case.lr * factor)  # SGD: a loss twice as large steps like twice the learning rate
    assert measured(reference_distance(reference, module.net)) <= EXACT_TOLERANCE


# ---------------------------------------------------------------- 10. a raw optimizer under manual optimization


class RawOptimizerModule(ManualModule):
    def training_step(self, batch, batch_idx: int) -> None:
        losses, _ = item_losses(self.net, batch)
        self.sample_backward(losses, mask=batch[2])
        optimizer = self.optimizers(use_pl_optimizer=False)
        optimizer.step()
        optimizer.zero_grad()


def test_raw_optimizer_step_fails_at_that_step() -> None:
    case = case_k3()
    with pytest.raises(
        RuntimeError, match=r"stepped without Lightning's on_before_optimizer_step.*self.optimizers\(\)"
    ):
        fit(Case(plan=case.plan), RawOptimizerModule(make_net(), case), [SampleCountRescaler()])


# ---------------------------------------------------------------- 11. Lightning's Tuner


class TunableModule(CountingModule):
    """Trains on a DataLoader over 80 samples with ``batch_size`` and ``lr`` attributes, as the Tuner expects."""

    def __init__(self, batch_size: int = 4, lr: float = 0.3) -> None:
        super().__init__(make_net(), Case(plan=[[]]))
        self.batch_size, self.lr = batch_size, lr
        x, y, _ = make_micro_batch(80, seed=3, tokens=2)
        self.data = TensorDataset(x, y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.sample_loss(*item_losses(self.net, (x, y, None))[:1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def reference_windows(self, k: int) -> list[list[MicroBatch]]:
        x, y = self.data.tensors
        batches = [
            (x[i : i + self.batch_size], y[i : i + self.batch_size], None) for i in range(0, len(x), self.batch_size)
        ]
        return split_into_windows(batches, k)


def tuner_trainer(epochs: int = 1) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_epochs=epochs, accumulate_grad_batches=3, callbacks=[SampleCountRescaler()],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip


def test_tuner_finds_an_lr_and_a_batch_size_then_the_fit_is_exact(tmp_path: Path, measured) -> None:
    module = TunableModule()
    trainer = tuner_trainer()
    tuner = Tuner(trainer)
    finder = tuner.lr_find(module, min_lr=1e-3, max_lr=1.0, num_training=6, early_stop_threshold=None)
    assert len(finder.results["loss"]) == 6 and torch.isfinite(torch.tensor(finder.results["loss"])).all()
    size = tuner.scale_batch_size(module, mode="power", steps_per_trial=1, init_val=2, max_trials=2)
    assert size == module.batch_size >= 4  # power mode doubled the initial 2 (Lightning 2.5 once more than 2.6)
    module.lr = 0.3
    trainer = tuner_trainer(epochs=2)
    trainer.fit(module)
    case = Case(plan=[[]], epochs=2)
    windows = module.reference_windows(k=3) * 2
    assert measured(reference_distance(case, module.net, windows=windows)) <= EXACT_TOLERANCE
