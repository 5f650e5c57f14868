"""Build and run one training job from a composed Hydra config (the body of ``scripts/train.py``)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_accum.mixin import MissingRescalerError
from lightning_accum_app.composition import data_trainer_kwargs, model_kwargs
from lightning_accum_app.launch import launched_nodes, slurm_tasks
from lightning_accum_app.sweep import METRICS_FILE


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """Instantiate the data module, the model and the Trainer of ``cfg``.

    The accumulation config alone decides K (``Trainer(accumulate_grad_batches)`` or a
    ``GradientAccumulationScheduler``) and the data module decides ``use_distributed_sampler``; a
    trainer config that sets one of those keys itself is refused.
    """
    datamodule = instantiate(cfg.data)
    try:
        model = instantiate(cfg.model, **model_kwargs(datamodule))
    except InstantiationException as err:
        raise TypeError(
            f"model {cfg.model._target_} does not fit data {cfg.data._target_} "
            f"(which provides {model_kwargs(datamodule)}): {err}"
        ) from err
    accumulation = instantiate(cfg.accumulation)
    decided = {**accumulation.trainer_kwargs(), **data_trainer_kwargs(datamodule)}
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
    """Refuse a sweep whose jobs would start processes that re-run the command line (and so the sweep).

    Distributed jobs are allowed in a sweep when each rank is a Slurm task started by srun
    (``hydra/launcher=slurm``), and only when Slurm started as many tasks as the trainer has ranks.
    """
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return
    trainer = cfg.trainer
    devices, num_nodes = trainer.get("devices", 1), int(trainer.get("num_nodes", 1))
    ddp_devices = trainer.get("strategy") == "ddp" and devices not in (1, "1")
    tasks = slurm_tasks(os.environ)
    if tasks is None:
        if ddp_devices or num_nodes > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(
                "A -m sweep cannot run distributed jobs: strategy='ddp' and torchrun start every rank from the "
                "command line, so each rank would run the whole sweep. Run distributed configurations one at a "
                "time (without -m), or sweep them on Slurm, one task per rank: `hydra/launcher=slurm trainer=slurm`."
            )
        return
    ranks = int(devices) * num_nodes if str(devices).isdigit() else None
    if ranks is not None and ranks != tasks:
        raise ValueError(
            f"This Slurm job has {tasks} tasks but the trainer has {ranks} ranks (devices={devices} x "
            f"num_nodes={num_nodes}). Set trainer.devices and trainer.num_nodes only: hydra/launcher=slurm "
            "derives tasks_per_node and nodes from them (do not override hydra.launcher.tasks_per_node)."
        )


def check_num_nodes(trainer: DictConfig, env: Mapping[str, str]) -> None:
    """Refuse a ``trainer.num_nodes`` that differs from the nodes torchrun or Slurm started the run on.

    ``trainer.num_nodes`` is the one key for the number of nodes: the trainer configs read it and
    ``hydra/launcher=slurm`` derives its ``nodes`` from it; torchrun's ``--nnodes`` must agree with it.
    """
    launched = launched_nodes(env)
    num_nodes = int(trainer.get("num_nodes", 1))
    if launched is not None and launched[0] != num_nodes:
        nodes, option = launched
        raise ValueError(
            f"{option} started this run on {nodes} nodes, but trainer.num_nodes={num_nodes}. "
            f"Pass trainer.num_nodes={nodes}: it is the one key for the number of nodes."
        )


def run_training(cfg: DictConfig) -> dict[str, float]:
    """Seed, build, fit; on rank 0 write ``metrics.json`` to ``cfg.paths.output_dir``; return the final metrics."""
    _check_launch(cfg)
    check_num_nodes(cfg.trainer, os.environ)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build(cfg)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except MissingRescalerError as error:  # the library names the Trainer argument; here it is a config key
        raise MissingRescalerError(
            f"{error} In this app the callbacks come from the config's `callbacks` group, which holds none "
            "(a `callbacks: null` in a debug or experiment config drops it). Keep it: `callbacks=default` or "
            "`callbacks=minimal` on the command line, or in that config `callbacks: {sample_count_rescaler: "
            "{_target_: lightning_accum.SampleCountRescaler}}` instead of `callbacks: null`."
        ) from error
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
