"""Lightning fits of the test cases: module-level LightningModules (picklable for ddp_spawn) and Trainers.

``fit`` runs a ``cases.Case`` with Lightning (``fit_mode``: in one of ``cases.MODES``); ``ReleaseProcessGroup``
ends every distributed fit cleanly: Lightning leaves the process group alive, and a gloo group still alive
while the interpreter shuts down can abort the process ("terminate called without an active exception") after
the fit finished.
"""

from __future__ import annotations

import csv
import os
import socket
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from cases import Case, count_case_items, make_net, make_optimizer
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from reference import MicroBatch, item_losses
from torch import nn
from torch.utils.data import DataLoader

from lightning_accum import SampleCountMixin, SampleCountRescaler

# Trainer arguments of every test fit: no logger, checkpoints, progress bar or model summary.
QUIET_TRAINER = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


class ReleaseProcessGroup(pl.Callback):
    """Destroy the default process group in ``teardown`` (after the fit; nothing collective follows it)."""

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


LAUNCHED_RANK = "LIGHTNING_ACCUM_TESTS_LAUNCHED_RANK"
"""Set (to 1) in a rank that ``rank_runs`` started: its fits join the rank's one process group."""


def in_launched_rank() -> bool:
    """Whether this process is a rank that ``rank_runs`` started."""
    return os.environ.get(LAUNCHED_RANK) == "1"


def ranks_strategy(ranks: int) -> tuple[str, list[pl.Callback]]:
    """The strategy of a CPU fit on ``ranks`` processes, and the callbacks that end it.

    From the test process: ``ddp_spawn`` for 2 ranks, and ``ReleaseProcessGroup``. In a rank that ``rank_runs``
    started: ``ddp`` in the process group that the rank keeps across its fits (and destroys once at its end).
    """
    if in_launched_rank():
        return ("ddp" if ranks > 1 else "auto"), []
    return ("ddp_spawn" if ranks > 1 else "auto"), [ReleaseProcessGroup()]


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


class CountingModule(ExactModule):
    """``ExactModule`` that also states its count rule, for ``SampleCountRescaler(mode="lookahead")``."""

    def count_items(self, batch) -> torch.Tensor:
        return count_case_items(batch)


class ManualModule(CountingModule):
    """Manual optimization: ``sample_backward`` per micro-batch, a step after every ``case.k_at(epoch)``
    micro-batches and at the epoch's last one; clipping (if any) after the rescale, in ``on_before_optimizer_step``.
    """

    def __init__(self, net: nn.Module, case: Case) -> None:
        super().__init__(net, case)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx: int) -> None:
        losses, _ = item_losses(self.net, batch)
        self.sample_backward(losses, mask=batch[2])
        if (batch_idx + 1) % self.case.k_at(self.current_epoch) == 0 or self.trainer.is_last_batch:
            optimizer = self.optimizers()
            optimizer.step()
            optimizer.zero_grad()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.case.clip_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.case.clip_norm, gradient_clip_algorithm="norm")
        if self.case.clip_value is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.case.clip_value, gradient_clip_algorithm="value")


class NaiveManualModule(ManualModule):
    """What users write today in their own loop: each micro-batch's item mean divided by K."""

    def training_step(self, batch, batch_idx: int) -> None:
        losses, mask = item_losses(self.net, batch)
        k = self.case.k_at(self.current_epoch)
        self.manual_backward((losses * mask).sum() / mask.sum().clamp_min(1) / k)
        if (batch_idx + 1) % k == 0 or self.trainer.is_last_batch:
            optimizer = self.optimizers()
            optimizer.step()
            optimizer.zero_grad()


def planned_trainer(
    case: Case,
    callbacks: list[pl.Callback],
    strategy: str,
    devices: int,
    logger: pl.loggers.Logger | bool,
    **trainer_kwargs,
) -> pl.Trainer:
    """A quiet Trainer for ``case`` (on the CPU unless ``accelerator`` is given): our own per-rank plan, so no
    injected sampler; a log row per step. ``keep_process_group=True`` leaves the process group alive after the
    fit, for a script that runs several distributed fits (and destroys it once at its end)."""
    keep = trainer_kwargs.pop("keep_process_group", False)
    return pl.Trainer(
        accelerator=trainer_kwargs.pop("accelerator", "cpu"),
        devices=devices,
        strategy=strategy,
        max_epochs=case.epochs,
        callbacks=[*callbacks] if keep else [*callbacks, ReleaseProcessGroup()],
        log_every_n_steps=1,
        use_distributed_sampler=False,
        **(QUIET_TRAINER | {"logger": logger}),
        **trainer_kwargs,
    )


def fp16_scaler_plugin(
    init_scale: float = 2.0**10, backoff_factor: float = 0.5, growth_interval: int = 2000, device: str = "cpu"
):
    """Real fp16 autocast with a GradScaler on ``device`` (``precision="16-mixed"`` alone falls back to bf16 on
    CPU). The initial scale 2**10 (not 2**16) keeps the first steps of these small nets from overflowing."""
    scaler = torch.amp.GradScaler(
        device, init_scale=init_scale, backoff_factor=backoff_factor, growth_interval=growth_interval
    )
    return MixedPrecision("16-mixed", device, scaler=scaler)


def precision_kwargs(precision: str, device: str = "cpu") -> dict[str, Any]:
    """Trainer arguments for ``precision``; ``"16-mixed"`` means fp16 autocast with dynamic loss scaling."""
    if precision == "16-mixed":
        return {"plugins": [fp16_scaler_plugin(device=device)]}
    return {"precision": precision}


def fit(
    case: Case,
    module: pl.LightningModule,
    callbacks: list[pl.Callback],
    strategy: str | pl.strategies.Strategy = "auto",
    devices: int = 1,
    logger: pl.loggers.Logger | bool = False,
    ckpt_path: str | Path | None = None,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """The one Lightning fit of the tests: ``module`` on ``case``, its K (or schedule of K) and clipping.

    Under automatic optimization Lightning accumulates ``case.k_at(epoch)`` micro-batches (a
    ``GradientAccumulationScheduler`` when K changes) and clips as the case says; a manual-optimization module
    steps and clips on its own (``ManualModule``), so the Trainer gets neither. ``trainer_kwargs`` override.
    """
    callbacks = list(callbacks)
    if getattr(module, "automatic_optimization", True):
        if isinstance(case.accumulation, int):
            trainer_kwargs.setdefault("accumulate_grad_batches", case.accumulation)
        else:
            callbacks.append(GradientAccumulationScheduler(scheduling=case.accumulation))
        trainer_kwargs.setdefault(
            "gradient_clip_val", case.clip_norm if case.clip_norm is not None else case.clip_value
        )
        trainer_kwargs.setdefault("gradient_clip_algorithm", "value" if case.clip_value is not None else "norm")
    trainer = planned_trainer(case, callbacks, strategy, devices, logger, **trainer_kwargs)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


MODULES: dict[str, type[PlannedModule]] = {
    "deferred": CountingModule,
    "lookahead": CountingModule,
    "manual": ManualModule,
    "naive": NaiveModule,
    "naive-manual": NaiveManualModule,
}
"""The module of each mode of ``cases.MODES``."""


def fit_mode(
    case: Case, mode: str, precision: str = "32-true", seed: int = 0, **fit_kwargs: Any
) -> tuple[nn.Module, pl.Trainer]:
    """Fit a fresh ``make_net(seed)`` on ``case`` in ``mode`` (``cases.MODES``) and ``precision``; the trained net
    and its Trainer. ``fit_kwargs`` go to ``fit`` (strategy, devices, logger, Trainer arguments)."""
    module = MODULES[mode](make_net(seed), case)
    callbacks: list[pl.Callback] = []
    if mode in ("deferred", "lookahead"):
        callbacks.append(SampleCountRescaler(mode=mode))
    elif mode == "manual":
        callbacks.append(SampleCountRescaler())
    trainer = fit(
        case, module, callbacks, **precision_kwargs(precision, fit_kwargs.get("accelerator", "cpu")), **fit_kwargs
    )
    return module.net, trainer


def read_metrics(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What Lightning (or a launcher) leaves in ``os.environ``: a process started with them joins that run's group."""


def clean_env() -> dict[str, str]:
    """This process's environment without the variables of a launcher, for a subprocess that starts its own run."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for key in LAUNCHER_VARIABLES:
        env.pop(key, None)
    return env


class RecordException(pl.Callback):
    """Writes the exception that ends a rank's fit to ``folder/rank<R>.txt``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        (self.folder / f"rank{trainer.global_rank}.txt").write_text(f"{type(exception).__name__}: {exception}")


def free_port() -> int:
    """A TCP port that nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
