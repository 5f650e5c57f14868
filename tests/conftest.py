"""Shared fixtures: a clean launcher environment per test, the session's shared fits, and ``measured``.

``measured`` records the distances that tests assert on; the run prints them all at the end. The docs quote
some of them from ``docs/figures/measured.json``: ``tests/test_measured_figures.py`` (run last) checks that this
session's figures are still within the quoted figures' bands, so a correctness test never fails because a
page is out of date. ``LIGHTNING_ACCUM_MEASURED_OUT=path`` writes this session's figures to ``path`` (merged
into what it holds): ``python scripts/refresh_figures.py --measure`` uses it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest
from cases import MATRIX, Cell
from fits import LAUNCHER_VARIABLES
from rank_runs import TwoRankRuns
from shared_fits import SharedFits

MEASURED: dict[str, float] = {}
OUT_ENV = "LIGHTNING_ACCUM_MEASURED_OUT"
LAST_MODULE = "test_measured_figures.py"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cells(*ids): the matrix cells (``cases.Cell.id``) a test reads from shared_fits"
    )
    config.addinivalue_line("markers", "two_ranks(*jobs): the jobs (``rank_jobs.JOBS``) a test reads from rank_runs")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """The figures check runs after every test that records figures."""
    items.sort(key=lambda item: item.path.name == LAST_MODULE)  # a stable sort keeps the order otherwise


@pytest.fixture(autouse=True)
def fresh_launcher_environment() -> Iterator[None]:
    """Every test starts without the launcher variables an earlier distributed fit left, and gets them back after.

    Lightning leaves ``MASTER_PORT`` & co. in ``os.environ`` after a fit, and a process group made in this process
    keeps its port: a later fit, or a subprocess inheriting the environment, would try to bind that port again.
    """
    with mock.patch.dict(os.environ):
        for key in LAUNCHER_VARIABLES:
            os.environ.pop(key, None)
        yield


@pytest.fixture(scope="session")
def shared_fits(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SharedFits:
    """The matrix's fits, once per session: the cells of the selected tests (a ``cell`` parameter, or the
    ``cells`` mark's ids) are fitted together per launch strategy when the first of them is asked for."""
    by_id = {cell.id: cell for cell in MATRIX}
    wanted: list[Cell] = []
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if isinstance(params.get("cell"), Cell):
            wanted.append(params["cell"])
        for mark in item.iter_markers("cells"):
            wanted += [by_id[cell_id] for cell_id in mark.args]
    return SharedFits(tmp_path_factory.mktemp("shared_fits"), wanted)


@pytest.fixture(scope="session")
def two_rank_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TwoRankRuns:
    """The two-rank jobs of the selected tests (their ``two_ranks`` marks), run in one launch when the first of
    them is asked for."""
    wanted = [job for item in request.session.items for mark in item.iter_markers("two_ranks") for job in mark.args]
    return TwoRankRuns(tmp_path_factory.mktemp("two_rank_runs"), wanted)


@pytest.fixture(scope="session")
def one_process_k4_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run folder of ``scripts/train.py`` in 1 process with K=4 over ``app_runs.DIGITS_TWO_EPOCHS``: the global
    windows of 64 digits that 2 ranks x K=2 take (torchrun, Slurm); run once per session for every such test."""
    from app_runs import DIGITS_TWO_EPOCHS, TRAIN, run, run_dirs

    tmp = tmp_path_factory.mktemp("one_process_k4")
    run([sys.executable, TRAIN, *DIGITS_TWO_EPOCHS, "accumulation.k=4", f"paths.log_dir={tmp}"], cwd=tmp)
    (folder,) = run_dirs(tmp)
    return folder


@pytest.fixture
def measured(request: pytest.FixtureRequest) -> Callable[..., float]:
    """``measured(value, label="", key=None)`` records ``value`` under ``key``, or the test's id (and label);
    returns it, for an assert."""

    def record(value: float, label: str = "", key: str | None = None) -> float:
        MEASURED[key or f"{request.node.nodeid} {label}".rstrip()] = float(value)
        return value

    return record


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    out = os.environ.get(OUT_ENV)
    if out and MEASURED:
        path = Path(out)
        data = json.loads(path.read_text()) if path.exists() else {}
        # Timings (labelled in seconds) depend on the machine's load: the docs never quote them as figures.
        data.update({key: value for key, value in MEASURED.items() if "seconds" not in key})
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if MEASURED:
        terminalreporter.section("measured distances asserted by the tests (each against its own reference)")
        for test_id, value in sorted(MEASURED.items()):
            terminalreporter.write_line(f"{value:9.2e}  {test_id}")
