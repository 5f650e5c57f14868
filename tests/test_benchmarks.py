"""Smoke test of the benchmark script: ``--quick`` runs end to end and prints every row. Its figures are not judged."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_accum.data import compiled_passes

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "benchmark_overhead.py"
CONFIGS = ("1 process", "2 DDP ranks (gloo)")
MODES = ("naive", "deferred", "lookahead", "deferred+noise")
NUMBER = r"-?\d+\.\d+"
SPREAD = rf"{NUMBER} \[{NUMBER}, {NUMBER}\]"
FOOTER = (
    "torch threads per rank",
    "constant offset",
    "fused rescale",
    "torch copy",
    "in-place multiply",
    "rescale bandwidth / copy",
    "rescale bandwidth / flat",
    "rescale allocates",
    "one fused rescale / one naive optimizer step",
    "look-ahead reads",
    "load average (1 min) at the start",
    "load average (1 min) at the end",
    "GradientNoiseScale, 1 process: time per step with / without",
    "GradientNoiseScale, 2 DDP ranks (gloo): time per step with / without",
)


@pytest.mark.slow
def test_quick_benchmark_prints_every_row(tmp_path: Path) -> None:
    # The checkout's library first, whatever is installed; 6 fits in fresh processes take one to two minutes.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("config"))
    rows = lines[header + 1 : header + 1 + len(CONFIGS) * len(MODES)]
    for row, (config, mode) in zip(rows, [(c, m) for c in CONFIGS for m in MODES], strict=True):
        # time and its ratio (median [min, max]), the fastest fits' ratio, memory and its ratio, the MiB difference
        cells = [SPREAD, SPREAD, NUMBER, SPREAD, SPREAD, rf"[+-]{NUMBER}"]
        assert re.fullmatch(rf"{re.escape(config)}\s+{re.escape(mode)}\s+" + r"\s+".join(cells), row), row
    for start in FOOTER:
        assert any(line.startswith(start) for line in lines), start


@pytest.mark.slow
def test_quick_sampler_benchmark_prints_every_row(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    script = ROOT / "scripts" / "benchmark_sampler.py"
    plot = tmp_path / "scaling.png"
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--plot", str(plot)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "cores; Python" in lines[0]
    numba_line = any(re.match(r"Numba kernels, once per process: \d+\.\d+ s", line) for line in lines)
    assert numba_line == compiled_passes.available()
    value = r"(?:-?\d+(?:\.\d+)?|-)"
    for mode in ("plain", "grouped", "max_tokens"):
        for ranks in (8, 64):  # new and old: ms per window, first batch, peak MiB
            row = rf"{mode}\s+{ranks}\s+1e\+05" + rf"\s+{value}" * 6
            assert any(re.fullmatch(row, line) for line in lines), (mode, ranks)
        for workers in (0, 2):
            assert any(re.fullmatch(rf"{mode}\s+{workers}\s+{NUMBER}", line) for line in lines), (mode, workers)
    for mode in (
        ("grouped", "max_tokens") if compiled_passes.available() else ()
    ):  # without Numba: Python, compiled, ratio
        for ranks in (8, 64):
            assert any(re.fullmatch(rf"{mode}\s+{ranks}" + rf"\s+{NUMBER}" * 3, line) for line in lines), (mode, ranks)
    assert any(line.startswith("load average at end") for line in lines)
    assert plot.stat().st_size > 0
