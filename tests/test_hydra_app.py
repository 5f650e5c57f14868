"""scripts/train.py as users run it, in subprocesses: default run, -m sweeps, trainer=ddp_cpu and torchrun."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from reference import relative_distance

from lightning_accum_app.launch import STAMP_FORMAT

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "scripts" / "train.py")
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def clean_env() -> dict[str, str]:
    """This process's environment without the variables of a launcher that may have started pytest."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run(args: list[str], cwd: Path, timeout: float = 240) -> str:
    proc = subprocess.run(args, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def free_port() -> int:
    """A TCP port that nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    return instantiate(cfg.model, **datamodule.model_kwargs())


def update_distance(run_dir: Path, reference_dir: Path) -> float:
    """``|theta - theta_ref| / |theta_ref - theta_0|`` of two runs' final parameters (checkpoints).

    theta_0 is rebuilt from the reference run's saved config; both runs start from it (same seed and model).
    """
    state = initial_model(OmegaConf.load(reference_dir / ".hydra" / "config.yaml")).state_dict()
    assert sorted(state) == sorted(checkpoint_state(reference_dir)), "the rebuilt model is not the run's model"
    return relative_distance(final_parameters(run_dir), final_parameters(reference_dir), flat_state(state))


@pytest.mark.slow
def test_default_run_from_another_directory_prints_metrics_and_its_folder(tmp_path):
    out = run([sys.executable, TRAIN], cwd=tmp_path)
    assert "Final metrics:" in out
    folder = Path(out.split("Output folder: ")[1].splitlines()[0])
    assert folder.parent == tmp_path / "outputs" / "train" / "runs"
    record = json.loads((folder / "metrics.json").read_text())
    assert record["metrics"]["val/acc"] > 0.8  # digits, 5 epochs
    assert (folder / ".hydra" / "config.yaml").exists()


@pytest.mark.slow
def test_sweep_runs_every_combination_and_writes_a_summary(tmp_path):
    args = ["-m", "accumulation=none,fixed", "data.micro_batch_size=16,64", "trainer.max_epochs=1", *QUIET]
    out = run([sys.executable, TRAIN, *args, f"paths.log_dir={tmp_path}"], cwd=tmp_path)
    (sweep,) = (tmp_path / "train" / "multirun").iterdir()
    assert [p.name for p in run_dirs(sweep)] == ["0", "1", "2", "3"]
    rows = {r["overrides"]: r for r in read_rows(sweep / "summary.csv")}
    assert len(rows) == 4 and "Sweep summary of 4 runs" in out
    assert (sweep / "summary.md").exists()
    assert (sweep / "loss_vs_items.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {r["items_seen"] for r in rows.values()} == {"1500"}
    # K=1 with micro-batches of 64 and K=4 with micro-batches of 16 are the same optimizer steps,
    # including the last window of 1500 % 64 = 28 samples (16 + 12).
    one = rows["accumulation=none data.micro_batch_size=64"]
    four = rows["accumulation=fixed data.micro_batch_size=16"]
    for name in ("train/loss", "train/loss_epoch", "val/loss"):
        assert float(four[name]) == pytest.approx(float(one[name]), rel=1e-5)
    assert float(rows["accumulation=none data.micro_batch_size=16"]["val/loss"]) != pytest.approx(
        float(one["val/loss"]), rel=1e-2
    )


@pytest.mark.slow
def test_parallel_launcher_sweep(tmp_path):
    args = ["-m", "hydra/launcher=parallel", "accumulation=none,fixed", "debug=fast", *QUIET]
    run([sys.executable, TRAIN, *args, f"paths.log_dir={tmp_path}"], cwd=tmp_path)
    (sweep,) = (tmp_path / "debug" / "multirun").iterdir()
    assert [p.name for p in run_dirs(sweep)] == ["0", "1"]
    assert len(read_rows(sweep / "summary.csv")) == 2


@pytest.mark.slow
def test_ddp_cpu_run_writes_one_folder_from_rank_zero(tmp_path):
    args = ["trainer=ddp_cpu", "debug=fast", *QUIET, f"paths.log_dir={tmp_path}"]
    out = run([sys.executable, TRAIN, *args], cwd=tmp_path)
    assert out.count("Final metrics:") == 1
    (folder,) = (tmp_path / "debug" / "runs").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [
        ".hydra", "checkpoints", "csv", "history.csv", "metrics.json", "train.log"
    ]  # fmt: skip
    assert json.loads((folder / "metrics.json").read_text())["global_step"] == 2  # 8 batches, K=4


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process_of_the_same_effective_batch(tmp_path, measured):
    # Global windows of 64 digits: 1 process x K=4 x 16 and 2 processes x K=2 x 16, SGD with momentum.
    common = ["experiment=digits_global", "trainer.max_epochs=2", *QUIET]
    run([sys.executable, TRAIN, *common, "accumulation.k=4", f"paths.log_dir={tmp_path / 'one'}"], cwd=tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", TRAIN, "trainer=torchrun"]
    out = run([*torchrun, *common, "accumulation.k=2", f"paths.log_dir={tmp_path / 'two'}"], cwd=tmp_path)
    assert out.count("Final metrics:") == 1
    (one,) = run_dirs(tmp_path / "one")
    (two,) = (tmp_path / "two" / "digits_global" / "runs").iterdir()  # one folder for both ranks
    assert [p.name for p in two.glob("*.log")] == ["train.log"]  # no log file from rank 1
    assert measured(update_distance(two, one)) < 1e-5
    ref_history, dist_history = read_rows(one / "history.csv"), read_rows(two / "history.csv")
    assert len(ref_history) == len(dist_history) == 2 * 24  # ceil(1500 / 64) steps per epoch
    for a, b in zip(ref_history, dist_history, strict=True):
        assert a["items_seen"] == b["items_seen"]
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-5)
    assert float(ref_history[-1]["loss"]) < 0.5 * float(ref_history[0]["loss"])


@pytest.mark.slow
def test_torchrun_two_nodes_equal_one_process_of_the_same_effective_batch(tmp_path, measured):
    # 2 nodes x 1 process, each node its own torchrun on localhost (gloo), against 1 process with the same
    # global windows of 64 digits: 2 ranks x K=2 x 16 and 1 x K=4 x 16, SGD with momentum, one epoch.
    common = ["experiment=digits_global", "trainer.max_epochs=1", *QUIET]
    run([sys.executable, TRAIN, *common, "accumulation.k=4", f"paths.log_dir={tmp_path / 'one'}"], cwd=tmp_path)
    two_nodes = [TRAIN, "trainer=torchrun", "trainer.num_nodes=2", *common, "accumulation.k=2"]
    outs = run_torchrun_nodes([*two_nodes, f"paths.log_dir={tmp_path / 'two'}"], nodes=2, cwd=tmp_path)
    assert [out.count("Final metrics:") for out in outs] == [1, 0]  # rank 0 runs on node 0
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (tmp_path / "node1.err").read_text()  # Lightning: rank 1 of 2 on node 1
    (one,) = run_dirs(tmp_path / "one")
    (two,) = (tmp_path / "two" / "digits_global" / "runs").iterdir()  # one folder: both nodes share the run stamp
    assert time.strptime(two.name, STAMP_FORMAT)  # rank 0's time, shared through torchrun's store
    assert OmegaConf.load(two / ".hydra" / "config.yaml").trainer.num_nodes == 2
    assert measured(update_distance(two, one)) < 1e-5
    ref_history, dist_history = read_rows(one / "history.csv"), read_rows(two / "history.csv")
    assert len(ref_history) == len(dist_history) == 24  # ceil(1500 / 64) steps
    for a, b in zip(ref_history, dist_history, strict=True):
        assert a["items_seen"] == b["items_seen"]
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-5)
    assert float(ref_history[-1]["loss"]) < 0.5 * float(ref_history[0]["loss"])


@pytest.mark.slow
def test_sweep_of_ddp_jobs_is_refused_before_training(tmp_path):
    args = [sys.executable, TRAIN, "-m", "trainer=ddp_cpu", "debug=fast", f"paths.log_dir={tmp_path}"]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "A -m sweep cannot run distributed jobs" in proc.stderr
    assert not list(tmp_path.rglob("checkpoints"))
