"""``refresh_figures.py --invariance SWEEP_DIR`` takes a new sweep's table and plot, not the committed ones."""

from __future__ import annotations

from pathlib import Path

import pytest
from refresh_figures import take_invariance


def test_a_new_sweeps_table_and_plot_replace_the_docs_copies(tmp_path: Path) -> None:
    sweep, docs = tmp_path / "multirun", tmp_path / "docs"
    sweep.mkdir()
    docs.mkdir()
    (docs / "invariance.md").write_text("old table\n")
    (sweep / "invariance.md").write_text("| exact 1 rank x K=1 x B=16 | 0.00e+00 | 2.8 |\n")
    (sweep / "invariance.png").write_bytes(b"\x89PNG new")
    take_invariance(sweep, docs)
    assert (docs / "invariance.md").read_text() == (sweep / "invariance.md").read_text()
    assert (docs / "invariance.png").read_bytes() == b"\x89PNG new"


def test_a_folder_without_the_sweeps_output_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"invariance.png missing: run `python scripts/train.py -m experiment=inv"):
        take_invariance(tmp_path, tmp_path)
