"""The ``measured`` fixture: tests record the distance they assert on, and the run prints them all at the end.

The docs quote these figures from ``docs/figures/measured.json``. Each time a test records a figure that the
docs quote, the fixture checks that the fresh value is still within the quoted figure's band
(``docs_figures.within_band``) and fails the test otherwise, naming the command that refreshes the docs.
``LIGHTNING_ACCUM_MEASURED_OUT=path`` writes this session's figures to ``path`` (merged into what it holds)
instead of checking: ``python scripts/refresh_figures.py --measure`` uses it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest
from docs_figures import MEASURED_FILE, REFRESH_COMMAND, within_band
from fits import LAUNCHER_VARIABLES

MEASURED: dict[str, float] = {}
OUT_ENV = "LIGHTNING_ACCUM_MEASURED_OUT"


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


def _quoted() -> dict[str, float]:
    return json.loads(MEASURED_FILE.read_text()) if MEASURED_FILE.exists() else {}


@pytest.fixture
def measured(request: pytest.FixtureRequest) -> Callable[..., float]:
    """``measured(value, label="")`` records ``value`` under the test's id (and label); returns it, for an assert."""
    quoted = {} if os.environ.get(OUT_ENV) else _quoted()

    def record(value: float, label: str = "") -> float:
        key = f"{request.node.nodeid} {label}".rstrip()
        MEASURED[key] = float(value)
        if key in quoted and not within_band(quoted[key], float(value)):
            pytest.fail(
                f"the docs quote {quoted[key]:.3g} for {key!r} but this run measured {float(value):.3g}: "
                f"run `{REFRESH_COMMAND} --measure` (then commit docs/figures/ and the pages it rewrites)"
            )
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
