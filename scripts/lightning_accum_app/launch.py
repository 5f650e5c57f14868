"""Launch helpers for ``scripts/train.py``: one output folder per run under torchrun or srun, logs from rank 0 only."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path

RUN_STAMP_ENV = "LIGHTNING_ACCUM_RUN_STAMP"
STAMP_FORMAT = "%Y-%m-%d_%H-%M-%S"


SLURM_INTERACTIVE_JOB_NAMES = ("bash", "interactive")


def slurm_tasks(env: Mapping[str, str]) -> int | None:
    """The number of Slurm tasks of this job step when each task is one rank, else ``None``.

    Follows Lightning's ``SLURMEnvironment.detect``: Slurm's tasks are the ranks when ``SLURM_NTASKS`` is
    set and the job is not named ``bash`` or ``interactive`` (names Lightning leaves to other launchers).

    Examples:
        >>> slurm_tasks({"SLURM_NTASKS": "2", "SLURM_JOB_NAME": "train"}), slurm_tasks({})
        (2, None)
        >>> slurm_tasks({"SLURM_NTASKS": "2", "SLURM_JOB_NAME": "interactive"}) is None
        True
    """
    if "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in SLURM_INTERACTIVE_JOB_NAMES:
        return None
    return int(env["SLURM_NTASKS"])


def launched_nodes(env: Mapping[str, str]) -> tuple[int, str] | None:
    """How many nodes torchrun or Slurm started this run on, and the launcher's option that says so.

    ``None`` when no launcher that spans nodes started this process (one process, or Lightning's own ddp children).

    Examples:
        >>> launched_nodes({"TORCHELASTIC_RUN_ID": "none", "GROUP_WORLD_SIZE": "2"})
        (2, 'torchrun --nnodes=2')
        >>> launched_nodes({"SLURM_NTASKS": "4", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "train"})
        (2, 'Slurm --nodes=2')
        >>> launched_nodes({}) is None
        True
    """
    if "TORCHELASTIC_RUN_ID" in env and "GROUP_WORLD_SIZE" in env:
        nodes = int(env["GROUP_WORLD_SIZE"])
        return nodes, f"torchrun --nnodes={nodes}"
    if slurm_tasks(env) is not None and "SLURM_NNODES" in env:
        nodes = int(env["SLURM_NNODES"])
        return nodes, f"Slurm --nodes={nodes}"
    return None


def process_rank(env: Mapping[str, str]) -> int:
    """The global rank of this process: ``RANK`` (torchrun), else ``SLURM_PROCID`` (a Slurm task that Lightning
    takes as a rank), else ``LOCAL_RANK`` (Lightning's ddp children).

    Examples:
        >>> process_rank({}), process_rank({"LOCAL_RANK": "1"}), process_rank({"RANK": "3", "LOCAL_RANK": "1"})
        (0, 1, 3)
        >>> process_rank({"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_JOB_NAME": "train"})
        1
    """
    if "RANK" in env:
        return int(env["RANK"])
    if slurm_tasks(env) is not None:
        return int(env.get("SLURM_PROCID", "0"))
    return int(env.get("LOCAL_RANK", "0"))


def nonzero_rank_overrides(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """Hydra overrides that keep a rank other than 0 from writing ``.hydra/`` and a job log file.

    Examples:
        >>> nonzero_rank_overrides(["train.py"], {"RANK": "1"})
        ['hydra.output_subdir=null', 'hydra/job_logging=none']
        >>> nonzero_rank_overrides(["train.py"], {"RANK": "0"})
        []
    """
    if process_rank(env) == 0:
        return []
    wanted = {"hydra.output_subdir": "hydra.output_subdir=null", "hydra/job_logging": "hydra/job_logging=none"}
    given = {arg.split("=", 1)[0].lstrip("+~") for arg in argv[1:]}
    return [override for key, override in wanted.items() if key not in given]


def share_run_stamp(env: Mapping[str, str], timeout_s: float = 300.0) -> str | None:
    """The run folder's stamp that every rank of a torchrun or srun launch shares (``None`` for one process).

    Under torchrun, rank 0 takes the time and publishes it in torchrun's agent key-value store; the other
    ranks wait for it, so all ranks of a job agree even when they start in different seconds. Without an
    agent store the stamp is torchrun's run id. Under ``srun`` (each Slurm task one rank) it is the Slurm
    job and step id, which every task of the step shares.

    Examples:
        >>> share_run_stamp({"SLURM_NTASKS": "2", "SLURM_JOB_ID": "41", "SLURM_STEP_ID": "0", "SLURM_JOB_NAME": "t"})
        'slurm_41.0'
        >>> share_run_stamp({}) is None
        True
    """
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        if slurm_tasks(env) is not None and "SLURM_JOB_ID" in env:
            return f"slurm_{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}"
        return None
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return f"torchrun_{run_id}"
    from torch.distributed import TCPStore

    store = TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=timeout_s))
    key = f"lightning_accum/run_stamp/{run_id}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if process_rank(env) == 0:
        store.set(key, time.strftime(STAMP_FORMAT))
    return store.get(key).decode()


def export_app_path(env: os._Environ | dict[str, str]) -> None:
    """Put the folder that holds ``lightning_accum_app`` first on ``PYTHONPATH`` in ``env``.

    Processes that the app starts and that unpickle its functions (Slurm jobs of the submitit launcher,
    joblib workers) then import the app as ``scripts/train.py`` does.

    Examples:
        >>> env = {"PYTHONPATH": "/opt/lib"}
        >>> export_app_path(env)
        >>> env["PYTHONPATH"].split(os.pathsep)[1], env["PYTHONPATH"].endswith("scripts" + os.pathsep + "/opt/lib")
        ('/opt/lib', True)
    """
    folder = str(Path(__file__).resolve().parent.parent)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != folder]
    env["PYTHONPATH"] = os.pathsep.join([folder, *paths])


def prepare_process(argv: list[str], env: os._Environ | dict[str, str]) -> None:
    """Before Hydra starts: export the app's path, share the torchrun or srun run stamp through ``env`` and
    quiet the non-zero ranks."""
    export_app_path(env)
    if RUN_STAMP_ENV not in env:
        stamp = share_run_stamp(env)
        if stamp is not None:
            env[RUN_STAMP_ENV] = stamp
    argv.extend(nonzero_rank_overrides(argv, env))
