"""The two-rank jobs that ``rank_runs`` runs in one launch, by name: each returns rank 0's result for its test.

A job runs in a rank that ``rank_runs`` started (``fits.ranks_strategy``: ``ddp``); its test asserts on the result.

Examples:
    >>> JOBS["stop-max_time"].args, "stop-max_time" in PREPARE
    (('max_time',), False)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import test_elastic_resume
import test_grouping
import test_invariance
import test_noise_scale
import test_padding
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


def padding_fit(mode: str, legacy: bool, folder: Path, **kwargs: Any) -> dict[str, Any]:
    """``test_padding``: a two-rank fit over a sampler that pads; its final parameters."""
    return {"parameters": test_padding.fit(2, mode, legacy, **kwargs)}


def static_graph_fit(folder: Path) -> dict[str, Any]:
    """``test_padding``: two ranks with ``static_graph=True`` and K=1; the final parameters."""
    return padding_fit("deferred", False, folder, split=(1, 4), strategy=test_padding.static_graph())


def static_graph_manual_fit(folder: Path) -> dict[str, Any]:
    """``test_padding``: two ranks with ``static_graph=True``, K=2 accumulated in the module's own loop."""
    return padding_fit("deferred", False, folder, split=(2, 2), strategy=test_padding.static_graph(), manual=True)


def invariance_fit(split: tuple[int, int, int], exact: bool, folder: Path) -> dict[str, Any]:
    """``test_invariance``: a two-rank split of the token task, exact or naive; its final parameters."""
    return {"parameters": test_invariance.fit(split, exact)}


def grouping_fit(grouping: str, folder: Path) -> dict[str, Any]:
    """``test_grouping``: a two-rank fit of the grouped language model; its final parameters."""
    return {"parameters": test_grouping.fit(test_grouping.GroupedLM(ranks=2, **test_grouping.GROUPINGS[grouping]))}


def noise_scale_fit(name: str, folder: Path) -> dict[str, Any]:
    """``test_noise_scale``: a two-rank fit with ``GradientNoiseScale``; the rows it logged on rank 0."""
    seed, k = test_noise_scale.TWO_RANK_FITS[name]
    return {"rows": test_noise_scale.fit(test_noise_scale.two_rank_plan(seed), k, folder, devices=2)}


def elastic_stop(splits, mode: str, grouped: bool, stop_step: int, folder: Path) -> dict[str, Any]:
    """``test_elastic_resume``, 2 ranks to 1: the two-rank fit that stops (the test resumes its checkpoint)."""
    test_elastic_resume.stop_under(folder, splits[0], mode, grouped, stop_step)
    return {}


def elastic_resume(splits, mode: str, grouped: bool, stop_step: int, folder: Path) -> dict[str, Any]:
    """``test_elastic_resume``, 1 rank to 2: the two-rank fit that resumes ``PREPARE``'s checkpoint."""
    return {"parameters": test_elastic_resume.resume_from(folder / "split.ckpt", splits[1], mode, grouped)}


def elastic_one_rank_stop(splits, mode: str, grouped: bool, stop_step: int, folder: Path) -> None:
    """``test_elastic_resume``, 1 rank to 2: the one-process fit that stops, run in the test process."""
    test_elastic_resume.stop_under(folder, splits[0], mode, grouped, stop_step)


ONE_TO_TWO = [run for run in test_elastic_resume.ELASTIC_RUNS if run[0] == test_elastic_resume.ONE_TO_TWO]
TWO_TO_ONE = [run for run in test_elastic_resume.ELASTIC_RUNS if run[0] == test_elastic_resume.TWO_TO_ONE]

PREPARE: dict[str, Callable[[Path], None]] = {
    test_elastic_resume.elastic_job(*run): partial(elastic_one_rank_stop, *run) for run in ONE_TO_TWO
}
"""One-process fits that a job continues: run in the test process, in the job's folder, before the launch."""

JOBS: dict[str, Callable[[Path], dict[str, Any]]] = {
    **{f"stop-{case}": partial(stop_and_resume, case) for case in TWO_RANK_STOPS},
    "resume-0workers": partial(resume_with_workers, 0),
    "resume-2workers": partial(resume_with_workers, 2),
    "resume-inside_window": resume_inside_window,
    **{
        test_padding.padding_job(mode, legacy): partial(padding_fit, mode, legacy)
        for mode in ("deferred", "lookahead")
        for legacy in (False, True)
    },
    "padding-read_ahead": partial(padding_fit, "lookahead", False, split=(11, 1)),
    "padding-static_graph": static_graph_fit,
    "padding-static_graph-manual": static_graph_manual_fit,
    **{
        test_invariance.invariance_job(split, exact): partial(invariance_fit, split, exact)
        for split in test_invariance.SPLITS
        if split[0] > 1
        for exact in (True, False)
    },
    **{f"grouping-{grouping}": partial(grouping_fit, grouping) for grouping in ("samples", "tokens")},
    **{name: partial(noise_scale_fit, name) for name in test_noise_scale.TWO_RANK_FITS},
    **{test_elastic_resume.elastic_job(*run): partial(elastic_stop, *run) for run in TWO_TO_ONE},
    **{test_elastic_resume.elastic_job(*run): partial(elastic_resume, *run) for run in ONE_TO_TWO},
}
