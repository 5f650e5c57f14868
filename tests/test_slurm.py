"""scripts/train.py on a real Slurm cluster (``.ci/slurm-up``: nodes n1 and n2, two slurmd on this host).

Swept through hydra-submitit-launcher (each job one sbatch job whose Slurm tasks are the ranks of a ddp run over
gloo) and launched by srun directly, on one node and on two. The tests skip when no Slurm controller answers,
unless LIGHTNING_ACCUM_REQUIRE_SLURM=1 (CI), where they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from app_runs import DIGITS_TWO_EPOCHS, TRAIN, final_parameters, read_rows, run, run_dirs, update_distance

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SWEEP = [sys.executable, TRAIN, "-m", "hydra/launcher=slurm", "trainer=slurm"]
# Global windows of 64 (K=2) and 32 (K=1) digits from 2 tasks x micro-batches of 16, SGD with momentum.
COMMON = DIGITS_TWO_EPOCHS


def slurm_controller_answers() -> bool:
    if shutil.which("scontrol") is None:
        return False
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=60)
    return ping.returncode == 0 and " is UP" in ping.stdout


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster() -> None:
    if slurm_controller_answers():
        return
    message = "no Slurm controller answers `scontrol ping`: start one on this machine with `sudo .ci/slurm-up`"
    if os.environ.get("LIGHTNING_ACCUM_REQUIRE_SLURM") == "1":
        pytest.fail(f"{message} (LIGHTNING_ACCUM_REQUIRE_SLURM=1 requires the Slurm tests)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def one_process_k4(one_process_k4_run: Path) -> Path:
    """Run folder of the reference: 1 process with K=4, the global windows of 64 digits of 2 ranks x K=2 (the
    session's one run of it, ``conftest.one_process_k4_run``, also for test_slurm_requeue and test_hydra_app)."""
    return one_process_k4_run


def assert_same_trajectory(run_dir: Path, reference_dir: Path) -> None:
    """Same items and losses at every optimizer step as the reference, which learned (its loss halved)."""
    history, reference = read_rows(run_dir / "history.csv"), read_rows(reference_dir / "history.csv")
    assert [r["items_seen"] for r in history] == [r["items_seen"] for r in reference]
    for a, b in zip(reference, history, strict=True):
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-5)
    assert float(reference[-1]["loss"]) < 0.5 * float(reference[0]["loss"])


def slurm_jobs(sweep: Path) -> dict[str, list[str]]:
    """Slurm job id (``<array>_<index>``, or ``<job>`` for a sweep of one job) -> the task ids submitit ran for it,
    from submitit's log files."""
    logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    jobs: dict[str, list[str]] = {}
    for log in logs:
        jobs.setdefault(log.parent.name, []).append(log.name.removesuffix("_log.out").rsplit("_", 1)[1])
    return jobs


def finished_steps(
    job: str, fields: tuple[str, ...] = ("NTasks",), timeout_s: float = 60.0
) -> dict[str, tuple[str, ...]]:
    """Step id -> (state, *``fields``) from sacct for one Slurm job, once sacct records that the job ended.

    submitit returns as soon as every task wrote its result, which can be before Slurm closes the step.
    """
    deadline = time.monotonic() + timeout_s
    columns = ",".join(["JobID", "State", *fields])
    while True:
        out = subprocess.run(
            ["sacct", "-n", "-P", "-j", job, "-o", columns], capture_output=True, text=True, check=True
        )
        steps = {step: tuple(values) for step, *values in (line.split("|") for line in out.stdout.splitlines())}
        if steps.get(job, ("PENDING",))[0] not in ("PENDING", "RUNNING", "COMPLETING") or time.monotonic() > deadline:
            return steps
        time.sleep(0.5)


def test_sweep_of_two_task_jobs_equals_one_process_of_the_same_effective_batch(tmp_path, measured):
    run([*SWEEP, *COMMON, "accumulation.k=1,2", f"paths.log_dir={tmp_path / 'slurm'}"], cwd=tmp_path)
    (sweep,) = (tmp_path / "slurm" / "digits_global" / "multirun").iterdir()
    assert [p.name for p in run_dirs(sweep)] == ["0", "1"]
    assert {r["overrides"] for r in read_rows(sweep / "summary.csv")} == {"accumulation.k=1", "accumulation.k=2"}

    # Two array jobs of the real cluster, each 2 tasks of one srun step that sacct reports COMPLETED.
    jobs = slurm_jobs(sweep)
    assert sorted(j.rsplit("_", 1)[1] for j in jobs) == ["0", "1"]
    for job, tasks in jobs.items():
        assert tasks == ["0", "1"]
        assert finished_steps(job)[f"{job}.0"] == ("COMPLETED", "2")
        outs = [(sweep / ".submitit" / job / f"{job}_{t}_log.out").read_text() for t in tasks]
        assert [out.count("Final metrics:") for out in outs] == [1, 0]  # printed by rank 0 only

    # References: 1 process with K=2 and K=4 takes the same global windows of 32 and 64 digits.
    run([sys.executable, TRAIN, "-m", *COMMON, "accumulation.k=2,4", f"paths.log_dir={tmp_path / 'one'}"], cwd=tmp_path)
    (reference,) = (tmp_path / "one" / "digits_global" / "multirun").iterdir()
    for job, ref, label in (("0", "0", "2 tasks x K=1"), ("1", "1", "2 tasks x K=2")):
        assert measured(update_distance(sweep / job, reference / ref), label) < 1e-5
        assert_same_trajectory(sweep / job, reference / ref)
    assert len(read_rows(sweep / "1" / "history.csv")) == 2 * 24  # ceil(1500 / 64) steps per epoch
    assert (final_parameters(sweep / "0") - final_parameters(sweep / "1")).norm() > 1e-2


def test_job_whose_slurm_tasks_do_not_match_the_trainer_ranks_is_refused(tmp_path):
    args = [*SWEEP, "debug=fast", "hydra.launcher.tasks_per_node=1", f"paths.log_dir={tmp_path}"]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "This Slurm job has 1 tasks but the trainer has 2 ranks" in proc.stderr
    assert not list(tmp_path.rglob("checkpoints"))


def test_srun_launch_writes_one_run_folder_and_equals_one_process(tmp_path, one_process_k4, measured):
    # What an sbatch script does: srun starts the 2 ranks itself, without Hydra's launcher.
    # Lightning reads the ranks per node from --ntasks-per-node (it refuses a bare --ntasks).
    srun = ["srun", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem=4G", "--job-name=train"]
    overrides = ["trainer=slurm", *COMMON, "accumulation.k=2", f"paths.log_dir={tmp_path / 'srun'}"]
    out = run([*srun, sys.executable, TRAIN, *overrides], cwd=tmp_path)
    assert out.count("Final metrics:") == 1  # printed by rank 0 only
    (folder,) = (tmp_path / "srun" / "digits_global" / "runs").iterdir()
    assert folder.name.startswith("slurm_")  # the job and step id, which both tasks share
    assert [p.name for p in run_dirs(tmp_path / "srun")] == [folder.name]
    assert sorted(p.name for p in (folder / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert measured(update_distance(folder, one_process_k4)) < 1e-5


# Two nodes: 1 task (rank) on each of n1 and n2. Lightning's SLURMEnvironment connects the ranks through the first
# node's name (n1), which resolves as on a real cluster: .ci/slurm-up maps n1 and n2 to 127.0.0.1 in /etc/hosts.
# So neither the app nor these tests set MASTER_ADDR (on a cluster whose node names resolve to the wrong
# network, export MASTER_ADDR before srun/sbatch: Slurm passes the environment on and Lightning takes it).
TWO_NODES = ["trainer.num_nodes=2", "trainer.devices=1"]


def test_sweep_of_two_node_jobs_runs_a_task_on_each_node_and_equals_one_process(tmp_path, one_process_k4, measured):
    run([*SWEEP, *COMMON, *TWO_NODES, "accumulation.k=2", f"paths.log_dir={tmp_path / 'slurm'}"], cwd=tmp_path)
    (sweep,) = (tmp_path / "slurm" / "digits_global" / "multirun").iterdir()
    (job_dir,) = run_dirs(sweep)
    ((job, tasks),) = slurm_jobs(sweep).items()
    assert tasks == ["0", "1"]
    # The job's srun step: 2 tasks on 2 nodes, n1 and n2 (sacct); each task's own Slurm environment, as submitit
    # logs it, puts rank 0 on node 0 and rank 1 on node 1 of 2.
    assert finished_steps(job, ("NNodes", "NTasks", "NodeList"))[f"{job}.0"] == ("COMPLETED", "2", "2", "n[1-2]")
    for task in tasks:
        log = (sweep / ".submitit" / job / f"{job}_{task}_log.out").read_text()
        assert f"local_rank=0(1), node={task}(2), global_rank={task}(2)" in log
    assert measured(update_distance(job_dir, one_process_k4)) < 1e-5
    assert_same_trajectory(job_dir, one_process_k4)


def test_srun_on_two_nodes_runs_a_task_on_each_node_and_equals_one_process(tmp_path, one_process_k4, measured):
    # srun --label prefixes each line with the task's rank; each task first prints the node Slurm started it on.
    srun = ["srun", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--mem=4G", "--job-name=train", "--label"]
    on_node = ["bash", "-c", 'echo "on node $SLURMD_NODENAME" && exec "$@"', "on_node"]
    overrides = ["trainer=slurm", *TWO_NODES, *COMMON, "accumulation.k=2", f"paths.log_dir={tmp_path / 'srun'}"]
    out = run([*srun, *on_node, sys.executable, TRAIN, *overrides], cwd=tmp_path)
    assert sorted(line for line in out.splitlines() if " on node " in line) == ["0: on node n1", "1: on node n2"]
    assert out.count("Final metrics:") == out.count("0: Final metrics:") == 1  # printed by rank 0 only
    (folder,) = run_dirs(tmp_path / "srun")  # one run folder for the 2 tasks: slurm_<job>.<step>
    job, step = folder.name.removeprefix("slurm_").split(".")
    assert finished_steps(job, ("NNodes", "NTasks", "NodeList"))[f"{job}.{step}"] == ("COMPLETED", "2", "2", "n[1-2]")
    assert measured(update_distance(folder, one_process_k4)) < 1e-5
    assert_same_trajectory(folder, one_process_k4)
