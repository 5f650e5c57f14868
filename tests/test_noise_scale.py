"""GradientNoiseScale against plain PyTorch: the same formulas on the same micro-batches, and a closed form.

The reference computes each step's small-batch gradients (the window's first micro-batch in one process, each
rank's window on two ranks) and the window's gradient with ``torch.autograd`` on a copy of the net, forms
``|G|²`` and ``tr(Σ)`` with the paper's estimators generalised to unequal counts, smooths them, and steps SGD.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from fits import QUIET_TRAINER, ranks_strategy
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_accum import GradientNoiseScale, SampleCountMixin, SampleCountRescaler

KEYS = ("train/noise_scale", "train/noise_scale_grad_squared", "train/noise_scale_trace")
SMOOTHING = 0.8
LR = 0.1
EXACT = 1e-5  # float32 gradients: relative to the magnitude of the squared norms that each estimate subtracts


def micro_batches(sizes: list[int], seed: int, features: int = 3) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, features, generator=gen), torch.randn(n, 2, generator=gen)) for n in sizes]


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def item_losses(net: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return (net(x) - y).square().sum(-1)


class PlanModule(SampleCountMixin, pl.LightningModule):
    """Trains ``make_net()`` with SGD on ``plan[rank]``, in order."""

    def __init__(self, plan: list[list[tuple[Tensor, Tensor]]]) -> None:
        super().__init__()
        self.net = make_net()
        self.plan = plan

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.plan[self.trainer.global_rank], batch_size=None)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.sample_loss(item_losses(self.net, batch))

    def count_items(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        return torch.tensor(len(batch[0]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


class Record(pl.Callback):
    """The logged noise-scale values after every optimizer step (rank 0 writes them to ``path``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[list[float]] = []
        self.last: Tensor | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # after the rescaler's (it is first)
        metrics = trainer.callback_metrics
        if all(k in metrics for k in KEYS) and metrics[KEYS[0]] is not self.last:
            self.last = metrics[KEYS[0]]
            self.rows.append([float(metrics[k]) for k in KEYS])

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            self.path.write_text(json.dumps(self.rows))


def fit(plan, k: int, tmp_path: Path, mode: str = "deferred", devices: int = 1) -> list[list[float]]:
    path = tmp_path / f"rows_{mode}_{k}_{devices}.json"
    strategy, release = ranks_strategy(devices)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=2,
        accumulate_grad_batches=k,
        use_distributed_sampler=False,
        callbacks=[SampleCountRescaler(mode=mode), GradientNoiseScale(smoothing=SMOOTHING), Record(path), *release],
        **QUIET_TRAINER,
    )
    trainer.fit(PlanModule(plan))
    return json.loads(path.read_text()) if trainer.global_rank == 0 else []  # rank 0 wrote them


# ---------------------------------------------------------------------------- the plain-PyTorch reference


def sum_gradient(net: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, int]:
    """``grad(sum of item losses)`` over ``batches`` (flat, float64) and their item count."""
    total = sum(item_losses(net, b).sum() for b in batches)
    grads = torch.autograd.grad(total, list(net.parameters()))
    return torch.cat([g.flatten() for g in grads]).double(), sum(len(b[0]) for b in batches)


def reference(plan: list[list[tuple[Tensor, Tensor]]], k: int, epochs: int = 2) -> list[list[float]]:
    """Per step: the smoothed ``B_simple``, ``|G|²``, ``tr(Σ)`` (rows as logged; steps without an estimate repeat),
    then the smoothed magnitudes of the terms whose difference each of ``|G|²`` and ``tr(Σ)`` is."""
    net = make_net()
    sums, weight, rows = [0.0, 0.0], 0.0, []
    magnitudes = [0.0, 0.0]
    ranks = len(plan)
    for _ in range(epochs):
        windows = [[rank[i : i + k] for i in range(0, len(rank), k)] for rank in plan]
        for step in range(len(windows[0])):
            per_rank = [sum_gradient(net, windows[r][step]) for r in range(ranks)]
            big_sum = sum(g for g, _ in per_rank)
            items = sum(n for _, n in per_rank)
            big = big_sum / items
            if ranks > 1:  # each rank's window
                small = [(g / n, n) for g, n in per_rank]
            elif len(windows[0][step]) > 1:  # the window's first micro-batch
                g, n = sum_gradient(net, windows[0][step][:1])
                small = [(g / n, n)]
            else:
                small = []
            if small:
                s = sum(float(g @ g) for g, _ in small) / len(small)
                h = sum(1.0 / n for _, n in small) / len(small)
                gap = h - 1.0 / items
                grad_sq = (h * float(big @ big) - s / items) / gap
                trace = (s - float(big @ big)) / gap
                sums = [SMOOTHING * sums[0] + (1 - SMOOTHING) * grad_sq, SMOOTHING * sums[1] + (1 - SMOOTHING) * trace]
                weight = SMOOTHING * weight + (1 - SMOOTHING)
                terms = [(h * float(big @ big) + s / items) / gap, (s + float(big @ big)) / gap]
                magnitudes = [SMOOTHING * m + (1 - SMOOTHING) * t for m, t in zip(magnitudes, terms, strict=True)]
            rows.append([sums[1] / sums[0], sums[0] / weight, sums[1] / weight, *(m / weight for m in magnitudes)])
            with torch.no_grad():
                offset = 0
                for p in net.parameters():
                    p -= LR * big[offset : offset + p.numel()].view_as(p).float()
                    offset += p.numel()
    return rows


def assert_rows_match(rows: list[list[float]], expected: list[list[float]]) -> None:
    """Each part within ``EXACT`` of the terms it subtracts; ``B_simple`` within what both errors propagate to."""
    assert len(rows) == len(expected)
    for (scale, grad_sq, trace), (b_want, g_want, t_want, g_terms, t_terms) in zip(rows, expected, strict=True):
        assert abs(grad_sq - g_want) <= EXACT * g_terms, (grad_sq, g_want)
        assert abs(trace - t_want) <= EXACT * t_terms, (trace, t_want)
        assert abs(scale - b_want) <= EXACT * (t_terms + abs(b_want) * g_terms) / abs(g_want), (scale, b_want)


# ---------------------------------------------------------------------------- exactness

RAGGED = [3, 1, 5, 4, 2, 2, 6, 1, 3, 2]  # K=3: windows of 9, 8, 10 and a last one of 2 items (no small batch)


@pytest.mark.parametrize("mode", ["deferred", "lookahead"])
def test_one_process_ragged_micro_batches(tmp_path: Path, mode: str) -> None:
    plan = [micro_batches(RAGGED, seed=1)]
    rows = fit(plan, 3, tmp_path, mode=mode)
    assert_rows_match(rows, reference(plan, 3))


UNEVEN = ([3, 5, 2, 4], [1, 2, 6, 1])  # two ranks' micro-batch sizes: every step's shares differ


def two_rank_plan(seed: int) -> list[list[tuple[Tensor, Tensor]]]:
    """``UNEVEN``'s micro-batches, rank ``r``'s drawn with ``seed + r``."""
    return [micro_batches(list(sizes), seed=seed + r) for r, sizes in enumerate(UNEVEN)]


TWO_RANK_FITS = {"noise-uneven": (10, 1), "noise-accumulating": (20, 2)}
"""The two-rank fits (``rank_jobs.JOBS``): the plan's seed and K."""


@pytest.mark.two_ranks("noise-uneven")
def test_two_ranks_uneven_shares(two_rank_runs) -> None:
    seed, k = TWO_RANK_FITS["noise-uneven"]  # rows of fit(two_rank_plan(seed), k, devices=2)
    assert_rows_match(two_rank_runs["noise-uneven"]["rows"], reference(two_rank_plan(seed), k))


@pytest.mark.slow
@pytest.mark.two_ranks("noise-accumulating")
def test_two_ranks_accumulating(two_rank_runs) -> None:
    seed, k = TWO_RANK_FITS["noise-accumulating"]
    assert_rows_match(two_rank_runs["noise-accumulating"]["rows"], reference(two_rank_plan(seed), k))


def test_one_process_without_accumulation_warns_once_and_logs_nothing(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = fit([micro_batches([2, 3, 4], seed=2)], 1, tmp_path)
    assert rows == []
    assert sum("no smaller batch" in str(w.message) for w in caught) == 1


def test_refuses_a_fit_without_the_rescaler() -> None:
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=[GradientNoiseScale()], **QUIET_TRAINER)
    with pytest.raises(RuntimeError, match="add SampleCountRescaler"):
        trainer.fit(PlanModule([micro_batches([2], seed=0)]))


# ---------------------------------------------------------------------------- a closed form

DIM, SIGNAL = 1024, 16.0  # gradient mean (SIGNAL, 0, …): |G|² = 256; covariance I: tr(Σ) = 1024; B_simple = 4
CONVERGENCE_STEPS, CONVERGENCE_SMOOTHING = 600, 0.995
CONVERGENCE_TOLERANCE = 0.05  # relative; the estimator's spread over seeds at these settings is 0.9% (plain sim)


class FrozenLinearRegression(SampleCountMixin, pl.LightningModule):
    """``y ≈ W·1`` with ``W = 0`` frozen (lr=0), ``y ~ N(-(SIGNAL, 0, …), I)``: item gradients ``W - y`` have mean
    ``(SIGNAL, 0, …)`` and covariance ``I``."""

    def __init__(self, micro_batch: int, steps: int, k: int) -> None:
        super().__init__()
        self.net = nn.Linear(1, DIM, bias=False)
        nn.init.zeros_(self.net.weight)
        gen = torch.Generator().manual_seed(0)
        self.y = torch.randn(steps * k * micro_batch, DIM, generator=gen)
        self.y[:, 0] -= SIGNAL
        self.micro_batch = micro_batch

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.y, batch_size=self.micro_batch)

    def training_step(self, y: Tensor, batch_idx: int) -> Tensor:
        return self.sample_loss(0.5 * (self.net(torch.ones(len(y), 1)) - y).square().sum(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_frozen_linear_regression_converges_to_the_closed_form() -> None:
    noise = GradientNoiseScale(smoothing=CONVERGENCE_SMOOTHING)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=2,
        callbacks=[SampleCountRescaler(), noise],
        **QUIET_TRAINER,
    )
    trainer.fit(FrozenLinearRegression(micro_batch=8, steps=CONVERGENCE_STEPS, k=2))
    assert trainer.global_step == CONVERGENCE_STEPS
    analytic_grad_sq, analytic_trace = SIGNAL**2, float(DIM)
    assert math.isclose(float(noise.smoothed.grad_squared), analytic_grad_sq, rel_tol=CONVERGENCE_TOLERANCE)
    assert math.isclose(float(noise.smoothed.trace), analytic_trace, rel_tol=CONVERGENCE_TOLERANCE)
    logged = float(trainer.callback_metrics["train/noise_scale"])
    assert math.isclose(logged, analytic_trace / analytic_grad_sq, rel_tol=CONVERGENCE_TOLERANCE), logged


# ---------------------------------------------------------------------------- loss forms without an item mean


class WeightedModule(PlanModule):
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        losses = item_losses(self.net, batch)
        return self.sample_loss(losses, weight=torch.ones_like(losses))


class BatchTermModule(PlanModule):
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.sample_loss(item_losses(self.net, batch)) + self.batch_loss(self.net[0].weight.square().sum())


@pytest.mark.parametrize(
    ("module", "mode", "match"),
    [(WeightedModule, "deferred", r"weight=.*sum\(w²\)"), (BatchTermModule, "lookahead", "batch_loss.*not items")],
)
def test_refuses_loss_forms_without_an_item_mean(module: type, mode: str, match: str) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=2,
        callbacks=[SampleCountRescaler(mode=mode), GradientNoiseScale()],
        **QUIET_TRAINER,
    )
    with pytest.raises(RuntimeError, match=match):
        trainer.fit(module([micro_batches([2, 3], seed=0)]))


# ---------------------------------------------------------------------------- a checkpoint inside a window


class ResumableLoader(DataLoader):
    """The plan's micro-batches in order; Lightning saves how many of the epoch it delivered and resumes after them."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        super().__init__(batches, batch_size=None)
        self.delivered, self.skip = 0, 0

    def __iter__(self):  # type: ignore[override]
        skip, self.skip = self.skip, 0
        self.delivered = skip
        for batch in list(super().__iter__())[skip:]:
            self.delivered += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"delivered": self.delivered}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skip = state["delivered"]


class ResumablePlanModule(PlanModule):
    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(self.plan[0])


class SaveAndStop(pl.Callback):
    """After micro-batch ``batch_idx`` of the first epoch: save ``path`` and stop."""

    def __init__(self, path: Path, batch_idx: int) -> None:
        self.path, self.batch_idx = path, batch_idx

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.current_epoch == 0 and batch_idx == self.batch_idx:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


@pytest.mark.parametrize("batch_idx", [3, 4])  # K=3: a window's first micro-batch; its second (first one measured)
def test_a_checkpoint_inside_a_window_resumes_the_estimate_exactly(tmp_path: Path, batch_idx: int) -> None:
    plan = [micro_batches(RAGGED, seed=1)]
    checkpoint = tmp_path / "inside.ckpt"
    rows: list[list[float]] = []
    for part, extra in enumerate([[SaveAndStop(checkpoint, batch_idx)], []]):
        record = Record(tmp_path / f"rows_{part}.json")
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=2,
            accumulate_grad_batches=3,
            callbacks=[SampleCountRescaler(), GradientNoiseScale(smoothing=SMOOTHING), record, *extra],
            **QUIET_TRAINER,
        )
        trainer.fit(ResumablePlanModule(plan), ckpt_path=checkpoint if part else None)
        rows += record.rows
    assert_rows_match(rows, reference(plan, 3))
