"""The ``measured`` fixture: tests record the distance they assert on, and the run prints them all at the end.

The README's tables quote these figures, so every CI log shows where they come from.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

MEASURED: dict[str, float] = {}


@pytest.fixture
def measured(request: pytest.FixtureRequest) -> Callable[..., float]:
    """``measured(value, label="")`` records ``value`` under the test's id (and label); returns it, for an assert."""

    def record(value: float, label: str = "") -> float:
        MEASURED[f"{request.node.nodeid} {label}".rstrip()] = float(value)
        return value

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if MEASURED:
        terminalreporter.section("measured distances asserted by the tests (each against its own reference)")
        for test_id, value in sorted(MEASURED.items()):
            terminalreporter.write_line(f"{value:9.2e}  {test_id}")
