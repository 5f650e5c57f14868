"""The example runs that the docs quote still print the quoted metrics (a fresh run, compared in band).

The tests' distances are checked against the quoted ones in tests/test_measured_figures.py.
"""

from __future__ import annotations

import pytest
from docs_figures import REFRESH_COMMAND, load, within_band
from refresh_figures import RUNS, run_app


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_example_run_prints_the_quoted_metrics(name: str) -> None:
    quoted = load("runs").get(name)
    assert quoted, f"docs/figures/runs.json has no run {name!r}: run {REFRESH_COMMAND} --runs"
    fresh = run_app(RUNS[name])
    drifted = {
        key: (value, fresh.get(key))
        for key, value in quoted.items()
        if key not in fresh or not within_band(value, fresh[key])
    }
    assert not drifted, f"quoted vs fresh {drifted}: run {REFRESH_COMMAND} --runs (and commit what it rewrites)"
