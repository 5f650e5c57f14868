"""scripts/critical_batch.py: a tiny Hydra multirun over K, read back from its run folders, fitted and drawn."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fits import clean_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_tiny_sweep_is_fitted_from_its_run_folders(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "scripts" / "critical_batch.py"), "--ks", "4,16", "--runs", str(tmp_path)]
    command += ["--out", str(tmp_path / "out"), "callbacks.stop_at_target.target=1.0"]
    proc = subprocess.run(command, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # A real multirun: one folder per K, each with the override Hydra swept and what StopAtTarget wrote.
    runs = sorted((tmp_path / "fixed").glob("*/target.json"))
    overrides = [(path.parent / ".hydra" / "overrides.yaml").read_text() for path in runs]
    assert [("accumulation.k=4" in o, "accumulation.k=16" in o) for o in overrides] == [(True, False), (False, True)]
    reached = [json.loads(path.read_text()) for path in runs]
    assert all(r["reached"] and r["target"] == 1.0 for r in reached)
    for path, r in zip(runs, reached, strict=True):  # the run stopped at the step it reports
        assert json.loads((path.parent / "metrics.json").read_text())["global_step"] == r["steps"]
    # The fit, recomputed from the folders with NumPy: steps = S_min + E_min / B.
    batches = np.array([8.0 * r["k"] for r in reached])
    slope, s_min = np.polyfit(1.0 / batches, [r["steps"] for r in reached], 1)
    summary = json.loads((tmp_path / "out" / "critical_batch.json").read_text())
    assert summary["S_min"] == pytest.approx(s_min, rel=1e-9)
    assert summary["E_min"] == pytest.approx(slope, rel=1e-9)
    assert summary["B_crit"] == pytest.approx(slope / s_min, rel=1e-9)
    assert summary["noise_scale_accumulation"]["k"] >= 2
    assert (tmp_path / "out" / "critical_batch.png").stat().st_size > 0
