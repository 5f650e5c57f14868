"""Build and run one training job from a composed Hydra config (the body of ``scripts/train.py``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_accum.examples.sweep import METRICS_FILE


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """Instantiate the data module, the model and the Trainer of ``cfg``.

    The accumulation config alone decides K (``Trainer(accumulate_grad_batches)`` or a
    ``GradientAccumulationScheduler``) and the data module decides ``use_distributed_sampler``; a
    trainer config that sets one of those keys itself is refused.
    """
    datamodule = instantiate(cfg.data)
    try:
        model = instantiate(cfg.model, **datamodule.model_kwargs())
    except InstantiationException as err:
        raise TypeError(
            f"model {cfg.model._target_} does not fit data {cfg.data._target_} "
            f"(which provides {datamodule.model_kwargs()}): {err}"
        ) from err
    accumulation = instantiate(cfg.accumulation)
    decided = {**accumulation.trainer_kwargs(), **datamodule.trainer_kwargs()}
    clash = sorted(set(decided) & set(cfg.trainer))
    if clash:
        raise ValueError(
            f"trainer config sets {clash}, which the accumulation/data configs decide ({decided}). "
            "Set K with `accumulation.k=...` (an int or an epoch -> K mapping), not on the trainer."
        )
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks + accumulation.callbacks(), logger=loggers or False, **decided
    )
    return datamodule, model, trainer


def _check_launch(cfg: DictConfig) -> None:
    """Refuse a sweep whose jobs would start processes that re-run the command line (and so the sweep)."""
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return
    ddp_devices = cfg.trainer.get("strategy") == "ddp" and cfg.trainer.get("devices", 1) not in (1, "1")
    if ddp_devices or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "A -m sweep cannot run distributed jobs: strategy='ddp' and torchrun start every rank from the "
            "command line, so each rank would run the whole sweep. Run distributed configurations one at a "
            "time (without -m)."
        )


def run_training(cfg: DictConfig) -> dict[str, float]:
    """Seed, build, fit; on rank 0 write ``metrics.json`` to ``cfg.paths.output_dir``; return the final metrics."""
    _check_launch(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build(cfg)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {name: float(value) for name, value in sorted(trainer.callback_metrics.items())}
    if trainer.is_global_zero:
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        record: dict[str, Any] = {"overrides": overrides, "metrics": metrics, "global_step": trainer.global_step}
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS_FILE).write_text(json.dumps(record, indent=2) + "\n")
    release_process_group()
    return metrics


def release_process_group() -> None:
    """Destroy the default process group after a successful fit, before the interpreter exits.

    Lightning leaves it alive; a gloo group still alive at interpreter shutdown can abort the
    process (``terminate called without an active exception``) after training finished.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
