"""Run the Hydra app (``scripts/train.py``) in a subprocess and read what its runs wrote."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from reference import relative_distance

ROOT = Path(__file__).resolve().parents[1]


TRAIN = str(ROOT / "scripts" / "train.py")


QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def run(args: list[str], cwd: Path, timeout: float = 240) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("metrics.json"))


def flat_state(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[k].flatten().double() for k in sorted(state)])


def checkpoint_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def final_parameters(run_dir: Path) -> torch.Tensor:
    return flat_state(checkpoint_state(run_dir))


def initial_model(cfg: DictConfig) -> pl.LightningModule:
    """The model a run of ``cfg`` starts from, built as ``run_training`` does: seed, data module, then model."""
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule = instantiate(cfg.data)
    return instantiate(cfg.model, **datamodule.model_kwargs())


def update_distance(run_dir: Path, reference_dir: Path) -> float:
    """``|theta - theta_ref| / |theta_ref - theta_0|`` of two runs' final parameters (checkpoints).

    theta_0 is rebuilt from the reference run's saved config; both runs start from it (same seed and model).
    """
    state = initial_model(OmegaConf.load(reference_dir / ".hydra" / "config.yaml")).state_dict()
    assert sorted(state) == sorted(checkpoint_state(reference_dir)), "the rebuilt model is not the run's model"
    return relative_distance(final_parameters(run_dir), final_parameters(reference_dir), flat_state(state))
