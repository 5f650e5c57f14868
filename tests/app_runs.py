"""Run the Hydra app (``scripts/train.py``) in subprocesses, torchrun nodes included, and read what its runs wrote."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from fits import clean_env, free_port
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from reference import relative_distance

from lightning_accum_app.composition import model_kwargs

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "scripts" / "train.py")
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
DIGITS_TWO_EPOCHS = ["experiment=digits_global", "trainer.max_epochs=2", *QUIET]
"""Two epochs of global windows of digits, as the runs on several ranks and their one-process reference take them."""


def run(args: list[str], cwd: Path, timeout: float = 240) -> str:
    proc = subprocess.run(args, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def descendants(pid: int) -> list[int]:
    """The ids of every live process below ``pid`` (from /proc): torchrun starts its workers in new sessions."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def stop(procs: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    """Stop the launchers in ``procs`` that still run: SIGTERM (torchrun then stops its workers), SIGKILL after
    ``grace_s`` to each launcher and every process below it."""
    running = [p for p in procs if p.poll() is None]
    below = {p.pid: descendants(p.pid) for p in running}
    for p in running:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in running:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        for pid in below[p.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def tail(path: Path, chars: int) -> str:
    return path.read_text()[-chars:]


def run_torchrun_nodes(args: list[str], nodes: int, cwd: Path, timeout: float = 480) -> list[str]:
    """Run ``args`` as ``nodes`` nodes x 1 process: one ``torchrun --node_rank=i`` per node on localhost, as each
    machine of a cluster runs it. Returns each node's stdout; fails when one fails or the time is up, and stops
    every torchrun (and its worker) that still runs, also then."""
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc_per_node=1"]
    launch += ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    logs = [(cwd / f"node{i}.out", cwd / f"node{i}.err") for i in range(nodes)]
    procs: list[subprocess.Popen] = []
    try:
        for i, (out, err) in enumerate(logs):
            with out.open("w") as stdout, err.open("w") as stderr:
                cmd = [*launch, f"--node_rank={i}", *args]
                procs.append(subprocess.Popen(cmd, cwd=cwd, env=clean_env(), stdout=stdout, stderr=stderr))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and all(p.poll() in (None, 0) for p in procs):
            assert time.monotonic() < deadline, f"{nodes} torchrun nodes still ran after {timeout} s"
            time.sleep(0.5)
        failed = {i: p.returncode for i, p in enumerate(procs) if p.returncode != 0}  # None: ran on meanwhile
        report = [
            f"node {i}, exit code {code}:\n{tail(logs[i][0], 2000)}\n{tail(logs[i][1], 4000)}"
            for i, code in failed.items()
        ]
        assert not failed, "\n".join(report)
    finally:
        stop(procs)
    return [out.read_text() for out, _ in logs]


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
    return instantiate(cfg.model, **model_kwargs(datamodule))


def update_distance(run_dir: Path, reference_dir: Path) -> float:
    """``|theta - theta_ref| / |theta_ref - theta_0|`` of two runs' final parameters (checkpoints).

    theta_0 is rebuilt from the reference run's saved config; both runs start from it (same seed and model).
    """
    state = initial_model(OmegaConf.load(reference_dir / ".hydra" / "config.yaml")).state_dict()
    assert sorted(state) == sorted(checkpoint_state(reference_dir)), "the rebuilt model is not the run's model"
    return relative_distance(final_parameters(run_dir), final_parameters(reference_dir), flat_state(state))
