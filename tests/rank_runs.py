"""Two-rank fits of several tests in one launch: one spawn of two processes runs them in sequence.

Most of a two-rank fit's time is starting its processes and importing torch in each (``ddp_spawn`` does it for every
fit). A test names the two-rank jobs it reads with ``@pytest.mark.two_ranks("job", ...)`` (on the test or on a
``pytest.param``); the session's ``two_rank_runs`` fixture (``conftest.py``) runs the jobs of every selected test in
one ``torch.multiprocessing`` spawn the first time a test asks for one. Both ranks run every job in the same order
in one process group (``strategy="ddp"``, the group kept across fits: ``fits.ranks_strategy``); each job writes
under its own folder, and rank 0 saves what it returns. The assertions stay in the tests.

A job is a function of ``rank_jobs.JOBS``: ``job(folder) -> dict`` of tensors and numbers; a job that continues a
one-process fit (a resume on two ranks) has that fit in ``rank_jobs.PREPARE``, run in the test process, in the job's
folder, before the launch.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing
from fits import LAUNCHED_RANK, free_port

LAUNCH_TIMEOUT = 480  # seconds for one launch of every selected job


def run_jobs(names: list[str], folder: Path, results_file: Path) -> None:
    """Run ``names`` on this rank of a two-rank group, job ``name`` in ``folder/name``; rank 0 saves
    ``results_file`` (job -> result)."""
    from rank_jobs import JOBS  # imported in the rank: the jobs' modules import this one's users

    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
        results[name] = JOBS[name](folder / name)
    torch.distributed.barrier()
    rank = torch.distributed.get_rank()
    torch.distributed.destroy_process_group()  # one process group served every fit
    if rank == 0:
        torch.save(results, results_file)


def spawned_rank(rank: int, names: list[str], folder: Path, results_file: Path, port: int) -> None:
    """A rank started by the spawn: the launcher's variables (as ``ddp_spawn`` sets them), then the jobs. A job
    that fails writes its traceback to ``folder/rank<R>.err``."""
    from shared_fits import set_rank_environment

    set_rank_environment(rank, port, **{LAUNCHED_RANK: "1"})
    try:
        run_jobs(names, folder, results_file)
    except BaseException:
        (folder / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def launch(names: list[str], folder: Path, results_file: Path) -> dict[str, Any]:
    """Run ``names`` in one spawn of two ranks, job ``name`` in ``folder/name``; each job's result (rank 0's)."""
    from shared_fits import spawn_two_ranks

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("rank*.err"):
        old.unlink()
    try:
        spawn_two_ranks(spawned_rank, (names, folder, results_file, free_port()), f"the two-rank launch of {names}",
                        LAUNCH_TIMEOUT)  # fmt: skip
    except BaseException as error:
        logs = "\n".join(p.read_text() for p in sorted(folder.glob("rank*.err")))
        raise RuntimeError(f"the two-rank launch of {names} failed:\n{logs[-6000:]}") from error
    return torch.load(results_file, weights_only=False)


class TwoRankRuns:
    """Results of two-rank jobs: every ``wanted`` job is run in one launch the first time one of them is asked for."""

    def __init__(self, folder: Path, wanted: list[str]) -> None:
        self.folder = folder
        self.wanted = list(dict.fromkeys(wanted))
        self.results: dict[str, Any] = {}
        self.launches = 0
        self.failed: BaseException | None = None

    def __getitem__(self, name: str) -> dict[str, Any]:
        """The result of job ``name`` (rank 0's); its files lie under ``folder_of(name)``."""
        if name not in self.results:
            if self.failed is not None:  # one failed launch fails every job it served, without a relaunch
                raise RuntimeError("the two-rank launch failed") from self.failed
            from rank_jobs import PREPARE

            names = [n for n in dict.fromkeys([*self.wanted, name]) if n not in self.results]
            self.launches += 1
            try:
                for n in names:
                    if n in PREPARE:
                        self.folder_of(n).mkdir(parents=True, exist_ok=True)
                        PREPARE[n](self.folder_of(n))
                self.results.update(launch(names, self.folder, self.folder / f"results{self.launches}.pt"))
            except BaseException as error:
                self.failed = error
                raise
        return self.results[name]

    def folder_of(self, name: str) -> Path:
        return self.folder / name
