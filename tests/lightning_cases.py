"""Module-level LightningModules and case builders for the core tests (picklable for ddp_spawn)."""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from distributed_exit import ReleaseProcessGroup
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from reference import MicroBatch, item_losses, merge_ranks, split_into_windows
from torch import nn
from torch.utils.data import DataLoader

from lightning_accum import SampleCountMixin, SampleCountRescaler

FEATURES, HIDDEN, CLASSES = 5, 8, 3
# Trainer arguments of every test fit: no logger, checkpoints, progress bar or model summary.
QUIET_TRAINER = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))


def make_micro_batch(size: int, seed: int, tokens: int | None = None, keep: float | None = None) -> MicroBatch:
    """``size`` samples (of ``tokens`` tokens each if given); ``keep`` is the probability an item counts."""
    gen = torch.Generator().manual_seed(seed)
    shape = (size,) if tokens is None else (size, tokens)
    x = torch.randn(*shape, FEATURES, generator=gen)
    y = torch.randint(0, CLASSES, shape, generator=gen)
    mask = None if keep is None else torch.rand(shape, generator=gen) < keep
    return x, y, mask


def make_optimizer(name: str, lr: float):
    def build(module: nn.Module) -> torch.optim.Optimizer:
        if name == "sgd":
            return torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)
        if name == "adamw":
            return torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.1)
        raise ValueError(name)

    return build


@dataclass
class Case:
    """Micro-batches per rank (the same every epoch) and how they are accumulated."""

    plan: list[list[MicroBatch]]
    accumulation: int | dict[int, int] = 1
    epochs: int = 2
    optimizer: str = "sgd"
    lr: float = 0.3
    clip_norm: float | None = None
    clip_value: float | None = None

    def k_at(self, epoch: int) -> int:
        if isinstance(self.accumulation, int):
            return self.accumulation
        return self.accumulation[max(e for e in self.accumulation if e <= epoch)]

    def reference_windows(self) -> list[list[MicroBatch]]:
        windows = []
        for epoch in range(self.epochs):
            k = self.k_at(epoch)
            windows += merge_ranks([split_into_windows(rank_plan, k) for rank_plan in self.plan])
        return windows


class PlannedModule(pl.LightningModule):
    """Trains ``net`` on the micro-batches of ``case.plan[global_rank]``, in order."""

    def __init__(self, net: nn.Module, case: Case) -> None:
        super().__init__()
        self.net = net
        self.case = case

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.case.plan[self.trainer.global_rank], batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.case.optimizer, self.case.lr)(self)


class ExactModule(SampleCountMixin, PlannedModule):
    def training_step(self, batch: MicroBatch, batch_idx: int) -> torch.Tensor:
        losses, _ = item_losses(self.net, batch)
        return self.sample_loss(losses, mask=batch[2])


class NaiveModule(PlannedModule):
    """What users write today: the micro-batch's own item mean."""

    def training_step(self, batch: MicroBatch, batch_idx: int) -> torch.Tensor:
        losses, mask = item_losses(self.net, batch)
        return (losses * mask).sum() / mask.sum().clamp_min(1)


def planned_trainer(
    case: Case,
    callbacks: list[pl.Callback],
    strategy: str,
    devices: int,
    logger: pl.loggers.Logger | bool,
    **trainer_kwargs,
) -> pl.Trainer:
    """A quiet CPU Trainer for ``case``: our own per-rank plan, so no injected sampler; a log row per step."""
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=case.epochs,
        callbacks=[*callbacks, ReleaseProcessGroup()],
        log_every_n_steps=1,
        use_distributed_sampler=False,
        **(QUIET_TRAINER | {"logger": logger}),
        **trainer_kwargs,
    )


def fit_case(
    case: Case,
    exact: bool,
    strategy: str = "auto",
    devices: int = 1,
    logger: pl.loggers.Logger | bool = False,
    seed: int = 0,
) -> nn.Module:
    """Fit a fresh ``make_net(seed)`` on ``case`` with Lightning; return the trained net."""
    module = (ExactModule if exact else NaiveModule)(make_net(seed), case)
    callbacks: list[pl.Callback] = [SampleCountRescaler()] if exact else []
    accumulate = 1
    if isinstance(case.accumulation, int):
        accumulate = case.accumulation
    else:
        callbacks.append(GradientAccumulationScheduler(scheduling=case.accumulation))
    trainer = planned_trainer(
        case,
        callbacks,
        strategy,
        devices,
        logger,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=case.clip_norm if case.clip_norm is not None else case.clip_value,
        gradient_clip_algorithm="value" if case.clip_value is not None else "norm",
    )
    trainer.fit(module)
    return module.net


def uneven_ranks_case() -> Case:
    """Two ranks, K=2: micro-batch sizes differ between ranks and so do the per-rank window totals."""
    sizes = [[6, 1, 3, 5, 2, 7], [1, 4, 8, 1, 2, 1]]
    plan = [[make_micro_batch(n, seed=10 * r + i) for i, n in enumerate(s)] for r, s in enumerate(sizes)]
    return Case(plan=plan, accumulation=2, epochs=3)


def masked_ranks_case() -> Case:
    """Two ranks, per-token masks, K=3, AdamW, clipping; three windows per epoch.

    Window 1: rank 1's share is empty. Window 2: both ranks count tokens. Window 3: empty on both
    ranks, so no update at all.
    """
    keep0 = [0.6] * 6 + [0.0] * 3
    keep1 = [0.0] * 3 + [0.3] * 3 + [0.0] * 3
    sizes0, sizes1 = [3, 1, 4, 2, 5, 2, 1, 2, 3], [2, 2, 1, 3, 1, 4, 2, 1, 1]
    rank0 = [
        make_micro_batch(n, seed=100 + i, tokens=4, keep=p) for i, (n, p) in enumerate(zip(sizes0, keep0, strict=True))
    ]
    rank1 = [
        make_micro_batch(n, seed=200 + i, tokens=4, keep=p) for i, (n, p) in enumerate(zip(sizes1, keep1, strict=True))
    ]
    return Case(plan=[rank0, rank1], accumulation=3, epochs=3, optimizer="adamw", lr=0.05, clip_norm=0.5)
