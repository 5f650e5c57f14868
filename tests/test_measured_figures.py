"""The figures that the docs quote from ``docs/figures/measured.json`` still match this session's measurements.

Tests record the distances they assert on (the ``measured`` fixture in ``tests/conftest.py``); this module runs
last (``conftest.pytest_collection_modifyitems``) and compares every recorded figure that the docs quote with
the quoted value, in its band (``docs_figures.within_band``). A drifted figure fails here, naming the command
that refreshes the docs; the correctness test that measured it passes or fails on its own assertion.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import MEASURED, OUT_ENV
from docs_figures import MEASURED_FILE, REFRESH_COMMAND, within_band


def test_quoted_figures_match_this_sessions_measurements() -> None:
    if os.environ.get(OUT_ENV):
        pytest.skip(f"{OUT_ENV} is set: this session writes the figures rather than checking them")
    quoted = json.loads(MEASURED_FILE.read_text())
    checked = {key: value for key, value in MEASURED.items() if key in quoted}
    if not checked:
        pytest.skip("no test that records a quoted figure ran in this session")
    drifted = {key: (quoted[key], value) for key, value in checked.items() if not within_band(quoted[key], value)}
    assert not drifted, (
        f"{len(drifted)} of the {len(checked)} figures measured here left the band of the figure the docs quote "
        f"(key: (quoted, measured)): {drifted}; run `{REFRESH_COMMAND} --measure` (then commit docs/figures/ and "
        "the pages it rewrites)"
    )
