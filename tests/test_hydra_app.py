"""scripts/train.py as users run it, in subprocesses: default run, -m sweeps, trainer=ddp_cpu and torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from app_runs import DIGITS_TWO_EPOCHS, QUIET, TRAIN, read_rows, run, run_dirs, run_torchrun_nodes, update_distance
from omegaconf import OmegaConf

from lightning_accum_app.launch import STAMP_FORMAT


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
        ".hydra",
        "checkpoints",
        "csv",
        "history.csv",
        "metrics.json",
    ]  # fmt: skip (no empty train.log: hydra/job_logging is stdout)
    assert json.loads((folder / "metrics.json").read_text())["global_step"] == 2  # 8 batches, K=4


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process_of_the_same_effective_batch(tmp_path, one_process_k4_run, measured):
    # Global windows of 64 digits: 1 process x K=4 x 16 (the session's one_process_k4_run) and 2 processes x K=2
    # x 16, SGD with momentum, two epochs.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", TRAIN, "trainer=torchrun"]
    out = run([*torchrun, *DIGITS_TWO_EPOCHS, "accumulation.k=2", f"paths.log_dir={tmp_path / 'two'}"], cwd=tmp_path)
    assert out.count("Final metrics:") == 1
    one = one_process_k4_run
    (two,) = (tmp_path / "two" / "digits_global" / "runs").iterdir()  # one folder for both ranks
    assert list(two.glob("*.log")) == []  # no job log file, from either rank
    assert measured(update_distance(two, one)) < 1e-5
    ref_history, dist_history = read_rows(one / "history.csv"), read_rows(two / "history.csv")
    assert len(ref_history) == len(dist_history) == 2 * 24  # ceil(1500 / 64) steps per epoch
    for a, b in zip(ref_history, dist_history, strict=True):
        assert a["items_seen"] == b["items_seen"]
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-5)
    assert float(ref_history[-1]["loss"]) < 0.5 * float(ref_history[0]["loss"])


@pytest.mark.slow
def test_torchrun_two_nodes_equal_one_process_of_the_same_effective_batch(tmp_path, one_process_k4_run, measured):
    # 2 nodes x 1 process, each node its own torchrun on localhost (gloo), against 1 process with the same
    # global windows of 64 digits: 2 ranks x K=2 x 16 and 1 x K=4 x 16 (the session's one_process_k4_run), SGD
    # with momentum, two epochs.
    two_nodes = [TRAIN, "trainer=torchrun", "trainer.num_nodes=2", *DIGITS_TWO_EPOCHS, "accumulation.k=2"]
    outs = run_torchrun_nodes([*two_nodes, f"paths.log_dir={tmp_path / 'two'}"], nodes=2, cwd=tmp_path)
    assert [out.count("Final metrics:") for out in outs] == [1, 0]  # rank 0 runs on node 0
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (tmp_path / "node1.err").read_text()  # Lightning: rank 1 of 2 on node 1
    one = one_process_k4_run
    (two,) = (tmp_path / "two" / "digits_global" / "runs").iterdir()  # one folder: both nodes share the run stamp
    assert time.strptime(two.name, STAMP_FORMAT)  # rank 0's time, shared through torchrun's store
    assert OmegaConf.load(two / ".hydra" / "config.yaml").trainer.num_nodes == 2
    assert measured(update_distance(two, one)) < 1e-5
    ref_history, dist_history = read_rows(one / "history.csv"), read_rows(two / "history.csv")
    assert len(ref_history) == len(dist_history) == 2 * 24  # ceil(1500 / 64) steps per epoch
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
