"""The two-rank jobs that ``rank_runs`` runs in one launch, by name: each returns rank 0's result for its test.

A job runs in a rank that ``rank_runs`` started (``fits.ranks_strategy``: ``ddp``); its test asserts on the result.

Examples:
    >>> sorted(JOBS)[:2]
    ['resume-0workers', 'resume-2workers']
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from stops_fits import first_fit, resumed_fit
from test_sampler_resume import MID_EPOCH, fit_inside_window, fit_with_resume

TWO_RANK_STOPS = ("scheduler_killed", "max_time", "max_steps")
"""The stops that ``test_stops`` resumes on two ranks (mode ``deferred``)."""


def stop_and_resume(case: str, folder: Path) -> dict[str, Any]:
    """``test_stops``: the fit that stops by ``case``, then the resumed fit; its final parameters."""
    parameters, _ = resumed_fit(case, first_fit(case, folder, 2, "deferred"), 2, "deferred")
    return {"parameters": parameters}


def resume_with_workers(num_workers: int, folder: Path) -> dict[str, Any]:
    """``test_sampler_resume``: a stop two steps into epoch 1 and the resumed fit; its final parameters."""
    parameters, _ = fit_with_resume(folder, 2, num_workers, MID_EPOCH)
    return {"parameters": parameters}


def resume_inside_window(folder: Path) -> dict[str, Any]:
    """``test_sampler_resume``: a checkpoint inside a window (and one at the step before it), then the resumed
    fit; its final parameters (the checkpoints stay in ``folder``)."""
    parameters, _ = fit_inside_window(folder, 2)
    return {"parameters": parameters}


JOBS: dict[str, Callable[[Path], dict[str, Any]]] = {
    **{f"stop-{case}": partial(stop_and_resume, case) for case in TWO_RANK_STOPS},
    "resume-0workers": partial(resume_with_workers, 0),
    "resume-2workers": partial(resume_with_workers, 2),
    "resume-inside_window": resume_inside_window,
}
