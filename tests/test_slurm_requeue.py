"""Slurm preemption on the real cluster (``.ci/slurm-up``: nodes n1 and n2): ``scancel --signal=USR1``, requeue, resume.

An sbatch job runs ``tests/elastic_fit.py`` through srun on 2 nodes, 1 task each, with
``SLURMEnvironment(auto_requeue=True)`` and ``StepBoundaryRequeue``. Once it has taken 3 optimizer steps the test sends
``SIGUSR1`` to its tasks, as Slurm does before a preemption or time limit with ``#SBATCH --signal=USR1@<seconds>``;
at the next step boundary Lightning saves ``hpc_ckpt_1.ckpt`` and requeues the job, and the requeued job resumes from
it (on 2 nodes, or on 1 after an administrator shrinks the pending job, as when one node is free) and ends on the
parameters of the plain-PyTorch run that never stopped. The tests skip without a Slurm controller, unless
LIGHTNING_ACCUM_REQUIRE_SLURM=1 (CI).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from app_runs import update_distance
from elastic import uninterrupted
from fits import clean_env
from reference import relative_distance
from test_slurm import COMMON, SWEEP, one_process_k4, slurm_cluster, slurm_jobs  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

FIT = Path(__file__).resolve().parent / "elastic_fit.py"


def cluster_state() -> str:
    """The queue and the nodes as the controller sees them, for a failure message."""
    queue = ["squeue", "-a", "-o", "%i %T %R %M"]
    nodes = ["sinfo", "-N", "-o", "%N %T %E"]
    return "\n".join(subprocess.run(c, capture_output=True, text=True).stdout for c in (queue, nodes))


def wait_for(condition, what: str, timeout_s: float = 300.0, gave_up=lambda: "") -> None:
    """Poll ``condition`` every second; fail with the cluster's state on timeout, or at once when ``gave_up``
    returns a reason (such as the process that should make the condition true having exited)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        reason = gave_up()
        assert not reason, f"stopped waiting for {what}: {reason}\n{cluster_state()}"
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}\n{cluster_state()}"
        time.sleep(1.0)


def nodes_idle() -> bool:
    idle = ["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"]
    return subprocess.run(idle, capture_output=True, text=True).stdout.split() == ["n1", "n2"]


@pytest.fixture(autouse=True)
def idle_nodes() -> None:
    """Both nodes idle before a test submits (a previous job may still be completing)."""
    wait_for(nodes_idle, "idle nodes", 120)


def release_requeued(job: str, *changes: str) -> None:
    """Start a requeued job soon instead of at Slurm's later begin time (minutes), with ``changes``.

    Not at once: the killed run's credential is revoked on its nodes with a time stamp of whole seconds, and a run
    launched within that second is refused ("Job credential revoked", the job FAILED). So wait until its nodes
    are idle again and let the run start a few seconds later, as Slurm's own requeue delay does.
    """
    wait_for(nodes_idle, "the killed run's nodes to be released", 120)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3", *changes], check=True)


def job_states(job: str) -> list[str]:
    """The job's states in sacct, one per run of it (a requeued run reads REQUEUED)."""
    out = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-j", job, "-o", "State"], capture_output=True, text=True)
    return out.stdout.split()


def requeued_and_pending(job: str) -> bool:
    """The controller holds the job again as pending after a requeue (then its begin time can be changed)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return "JobState=PENDING" in out and "Restarts=0" not in out


def preempted_job(root: Path, shrink_to_one_node: bool) -> str:
    """Submit the 2-node job, signal it after step 3, release the requeued job (optionally on 1 node), wait for it."""
    script = root / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --nodes=2 --ntasks-per-node=1 --cpus-per-task=1 --mem=2G --time=10\n"
        f"#SBATCH --requeue --open-mode=append --output={root / 'job.out'}\n"
        'echo "start restart=${SLURM_RESTART_COUNT:-0} nodes=$SLURM_JOB_NUM_NODES"\n'
        # One task per node of this run of the job: a requeued job may hold fewer nodes than the first run.
        "srun --nodes=$SLURM_JOB_NUM_NODES --ntasks=$SLURM_JOB_NUM_NODES --ntasks-per-node=1 \\\n"
        f"  {sys.executable} {FIT} {root} {root / 'final.pt'} --slow=0.5\n"
    )
    job = subprocess.run(
        ["sbatch", "--parsable", str(script)], env=clean_env(), capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        progress = root / "progress.txt"
        wait_for(lambda: progress.exists() and int(progress.read_text().split()[0]) >= 3, "3 optimizer steps")
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
        wait_for(lambda: requeued_and_pending(job), "the job to be requeued")
        release_requeued(job, *(["NumNodes=1-1", "NumTasks=1"] if shrink_to_one_node else []))  # on 1 node if asked

        def run_failed() -> str:
            state = job_states(job)[-1:]
            ended = state and state[0] not in ("REQUEUED", "PENDING", "RUNNING", "COMPLETING", "COMPLETED")
            return f"the requeued run ended {state[0]}:\n{(root / 'job.out').read_text()[-3000:]}" if ended else ""

        wait_for(lambda: job_states(job)[-1:] == ["COMPLETED"], "the requeued job to complete", gave_up=run_failed)
    finally:
        subprocess.run(["scancel", job])
    return job


@pytest.fixture(scope="module")
def reference():
    return uninterrupted()


@pytest.mark.parametrize("nodes_after", [2, 1])
def test_preempted_job_is_requeued_and_ends_on_the_uninterrupted_parameters(
    tmp_path, reference, measured, nodes_after
) -> None:
    job = preempted_job(tmp_path, shrink_to_one_node=nodes_after == 1)
    assert job_states(job) == ["REQUEUED", "COMPLETED"]
    log = (tmp_path / "job.out").read_text()
    assert "start restart=0 nodes=2" in log and f"start restart=1 nodes={nodes_after}" in log, log
    # Saved at a step boundary after the signal: the second run started there, on its own number of ranks.
    hpc = torch.load(tmp_path / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    first, second = (tmp_path / "starts.txt").read_text().splitlines()
    assert first == "0 0 2" and second == f"1 {hpc['global_step']} {nodes_after}"
    assert hpc["global_step"] >= 3
    (rescaler,) = [state for key, state in hpc["callbacks"].items() if key.startswith("SampleCountRescaler")]
    assert rescaler["window"] is None  # no partial window: the checkpoint lies at a step boundary
    initial, final = reference
    assert measured(relative_distance(torch.load(tmp_path / "final.pt"), final, initial)) < 1e-6


def test_app_job_through_submitit_is_requeued_and_equals_one_process(tmp_path, one_process_k4, measured) -> None:  # noqa: F811
    # The Hydra app's sweep of one job (hydra/launcher=slurm: submitit, 2 tasks x K=2 on one node). Once epoch 0's
    # checkpoint exists, the job's tasks get SIGUSR1; the app's StepBoundaryRequeue (callbacks/default) saves
    # hpc_ckpt_1.ckpt in the job's run folder at the next step boundary and Lightning requeues the array task;
    # submitit waits for the requeued run, which resumes there and ends on the 1-process K=4 parameters.
    # Epoch 1's steps sleep 0.25 s each (about 6 s in all, the computation unchanged), so that the signal sent once
    # epoch 0's checkpoint exists lands inside epoch 1: unslowed, epoch 1 can end before the signal arrives.
    slow = [
        "+callbacks.slow._target_=slow_steps.SlowStepsFrom",
        "+callbacks.slow.epoch=1",
        "+callbacks.slow.seconds=0.25",
    ]
    args = [*SWEEP, *COMMON, "accumulation.k=2", *slow, f"paths.log_dir={tmp_path / 'slurm'}"]
    env = {**clean_env(), "PYTHONPATH": str(Path(__file__).parent)}  # sbatch passes the environment to the job
    with (tmp_path / "sweep.out").open("w") as out, (tmp_path / "sweep.err").open("w") as err:
        sweep_proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=out, stderr=err)
    try:

        def sweep_ended() -> str:
            if sweep_proc.poll() is None:
                return ""
            logs = "".join(p.read_text()[-2000:] for p in (tmp_path / "slurm").rglob("*_log.err"))
            return (
                f"the sweep exited ({sweep_proc.returncode}):\n{(tmp_path / 'sweep.err').read_text()[-3000:]}\n{logs}"
            )

        # last.ckpt: saved at epoch 0's end and kept (epoch_000.ckpt is deleted when epoch 1 scores better).
        wait_for(lambda: any((tmp_path / "slurm").rglob("last.ckpt")), "epoch 0's checkpoint", gave_up=sweep_ended)
        (sweep,) = (tmp_path / "slurm" / "digits_global" / "multirun").iterdir()
        (job,) = slurm_jobs(sweep) or [p.name for p in (sweep / ".submitit").iterdir() if "_" in p.name]
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
        wait_for(lambda: requeued_and_pending(job), "the job to be requeued", gave_up=sweep_ended)
        release_requeued(job)
        assert sweep_proc.wait(timeout=400) == 0, (tmp_path / "sweep.err").read_text()[-5000:]
    finally:
        if sweep_proc.poll() is None:
            sweep_proc.kill()
    # submitit returns once every task wrote its result, which can be before Slurm closes the job.
    wait_for(lambda: job_states(job) == ["REQUEUED", "COMPLETED"], "sacct to record the requeued run's end", 60)
    run_dir = sweep / "0"
    hpc = torch.load(run_dir / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert hpc["epoch"] == 1 and hpc["global_step"] > 24  # inside epoch 1, after the signal
    (rescaler,) = [state for key, state in hpc["callbacks"].items() if key.startswith("SampleCountRescaler")]
    assert rescaler["window"] is None
    assert measured(update_distance(run_dir, one_process_k4)) < 1e-6
