"""Regenerate the figures that the README and docs quote, and rewrite their marked blocks.

    python scripts/refresh_figures.py            # re-render every marked block from docs/figures/*.json
    python scripts/refresh_figures.py --check    # exit 1 if a page is out of date (tests/test_figures.py)
    python scripts/refresh_figures.py --runs     # re-run the example app runs -> docs/figures/runs.json
    python scripts/refresh_figures.py --measure  # re-run the tests that record figures -> measured.json
    python scripts/refresh_figures.py --extras   # fresh venv per install extra -> extras.json (minutes)
    python scripts/refresh_figures.py --invariance multirun/DAY/TIME  # a new invariance sweep's table and plot

The example runs and the tests' distances are deterministic on a given platform: ``tests/test_figures.py``
re-runs the example runs, and ``tests/test_measured_figures.py`` (run last) checks every quoted distance that
the session's tests recorded against ``docs/figures/measured.json``, so quoted figures cannot drift silently. Timings
(extras' install sizes, benchmarks) are quoted with the machine they come from, not checked.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from docs_figures import MEASURED_FILE, ROOT, documents, load, render_text, save

PYTHON = sys.executable
INVARIANCE_TABLE = ROOT / "docs" / "invariance.md"
# name -> the app's overrides; tests/test_figures.py re-runs each and compares with docs/figures/runs.json.
RUNS: dict[str, list[str]] = {
    "default": [],
    "digits_global_k4": ["experiment=digits_global", "accumulation.k=4"],
}
RUN_METRICS = ["train/items", "train/loss", "train/loss_epoch", "val/acc", "val/loss"]
# Tests that record figures (the ``measured`` fixture), excluding Slurm (it needs a cluster: .ci/slurm-up). Each
# also names a docs table: the figures whose keys start with its path. The exactness matrix (test_exactness.py)
# records its quoted figures under the keys of the tests that measured them before it (test_precision.py and
# test_manual.py among them: ``cases.FIGURE_KEYS``).
MEASURE_TESTS = [
    "tests/test_exactness.py",
    "tests/test_precision.py",
    "tests/test_manual.py",
    "tests/test_reliability.py",
    "tests/test_sampler_resume.py",
    "tests/test_stops.py",
    "tests/test_grouping.py",
    "tests/test_demos_models.py",
    "tests/test_logging_and_state.py",
    "tests/test_hydra_app.py",
    "tests/test_hydra_runs.py",
    "tests/test_slurm.py",
]


def train(overrides: list[str], folder: Path) -> None:
    """Run ``scripts/train.py overrides`` with its run (or sweep) folder ``folder``, from a scratch directory."""
    key = (
        "hydra.sweep.dir"
        if "-m" in overrides or any(o.startswith("hparams_search=") for o in overrides)
        else ("hydra.run.dir")
    )
    command = [PYTHON, str(ROOT / "scripts" / "train.py"), *overrides, f"{key}={folder}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [*command, "trainer.enable_progress_bar=false"], check=True, cwd=folder.parent, env=env, capture_output=True
    )


def run_app(overrides: list[str]) -> dict[str, float]:
    """Run ``scripts/train.py`` with ``overrides`` in a temporary folder and return its final metrics."""
    with tempfile.TemporaryDirectory(prefix="figures-") as tmp:
        train(overrides, Path(tmp) / "run")
        metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())["metrics"]
    return {name: round(float(metrics[name]), 6) for name in RUN_METRICS if name in metrics}


SWEEP = ["-m", "accumulation.k=1,2,4", "data.micro_batch_size=16,64"]
OPTUNA = ["hparams_search=digits_optuna"]


def run_sweep(overrides: list[str]) -> dict[str, str]:
    """Run a ``-m`` sweep of the app; return its ``summary.md`` and Optuna's ``optimization_results.yaml``."""
    with tempfile.TemporaryDirectory(prefix="figures-") as tmp:
        train(overrides, Path(tmp) / "sweep")
        out = {}
        for name in ("summary.md", "optimization_results.yaml"):
            path = Path(tmp) / "sweep" / name
            if path.exists():
                out[name] = path.read_text()
    return out


def render_sweep() -> str:
    """The sweep summary as the app prints it."""
    if "sweep" not in load("runs"):
        return missing("--runs")
    summary = load("runs")["sweep"]["summary.md"].strip().splitlines()
    rows = [line for line in summary if line.startswith("|")]
    return "\n".join(["```text", f"Sweep summary of {len(rows) - 2} runs:", *rows, "```"])


def render_optuna() -> str:
    """Optuna's best parameters and value, as Hydra prints them."""
    import yaml

    if "optuna" not in load("runs"):
        return missing("--runs")
    result = yaml.safe_load(load("runs")["optuna"]["optimization_results.yaml"])
    best = f"[HYDRA] Best parameters: {result['best_params']}\n[HYDRA] Best value: {result['best_value']}"
    return f"```text\n{best}\n```"


def missing(option: str) -> str:
    """The placeholder of a block whose JSON is not generated yet."""
    return f"_Not generated yet: run `python scripts/refresh_figures.py {option}`._"


def fmt(value: float) -> str:
    """A figure with 3 significant digits (``0.49``, ``2.7e-07``)."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2g}" if abs(value) < 1e-3 and value else f"{value:.3g}"


def render_run(name: str) -> Callable[[], str]:
    """The app's ``Final metrics:`` printout for run ``name``."""

    def render() -> str:
        if not load("runs").get(name):
            return missing("--runs")
        metrics = load("runs")[name]
        lines = ["Final metrics:", *(f"  {key:<20} {value:g}" for key, value in metrics.items())]
        lines.append("Output folder: /.../outputs/train/runs/<date>_<time>")
        return "\n".join(["```text", *lines, "```"])

    return render


def render_digits_global() -> str:
    if not load("runs").get("digits_global_k4"):
        return missing("--runs")
    metrics = load("runs")["digits_global_k4"]
    return (
        f"The first prints `val/loss {metrics['val/loss']:g}` and `val/acc {metrics['val/acc']:g}`"
        " (`tests/test_figures.py` re-runs it); the torchrun run trains the same model."
    )


def render_measured(prefix: str) -> Callable[[], str]:
    """A table of every figure recorded by the tests in file ``prefix`` (a test file's path)."""

    def render() -> str:
        rows = [
            (key.split("::", 1)[1], value)
            for key, value in sorted(load("measured").items())
            if key.startswith(prefix + "::")
        ]
        if not rows:
            return missing("--measure")
        lines = ["| test (and label) | measured |", "| --- | --- |"]
        lines += [f"| `{test}` | {fmt(value)} |" for test, value in rows]
        return "\n".join(lines)

    return render


def render_naive_range() -> str:
    # Naive runs whose weighting is already right (K = 1: one micro-batch per step) are at 0 and left out.
    values = [
        v for k, v in load("measured").items() if k.startswith("tests/test_exactness.py::") and "naive" in k and v > 0
    ]
    if not values:
        return "far (run `python scripts/refresh_figures.py --measure`)"
    return f"{min(values):.2f} to {max(values):.2f}"


def invariance_distances() -> dict[str, float]:
    """Each run's distance to the reference run in the invariance sweep's table (docs/invariance.md)."""
    rows = [
        line.strip("|").split("|")
        for line in INVARIANCE_TABLE.read_text().splitlines()
        if line.startswith("| exact") or line.startswith("| naive")
    ]
    return {label.strip(): float(value) for label, value, _ in rows}


def render_invariance_range() -> str:
    distance = invariance_distances()
    naive = [v for label, v in distance.items() if label.startswith("naive")]
    exact = [v for label, v in distance.items() if label.startswith("exact")]
    return (
        f"naive runs end {min(naive):.2f} to {max(naive):.2f} of the update away, exact runs at most {max(exact):.1e}"
    )


def take_invariance(sweep_dir: Path, docs: Path = ROOT / "docs") -> None:
    """Copy a new invariance sweep's ``invariance.md`` and ``invariance.png`` into ``docs`` (the plot follows)."""
    names = ("invariance.md", "invariance.png")
    missing = [str(sweep_dir / name) for name in names if not (sweep_dir / name).is_file()]
    if missing:
        sys.exit(f"{', '.join(missing)} missing: run `python scripts/train.py -m experiment=invariance` first")
    for name in names:
        shutil.copyfile(sweep_dir / name, docs / name)


def render_extras() -> str:
    data = load("extras")
    if not data:
        return missing("--extras")
    lines = ["| install | packages | disk (MiB) |", "| --- | --- | --- |"]
    for row in data["rows"]:
        target = "`pip install .` (no extra)" if row["extra"] == "core" else f'`pip install ".[{row["extra"]}]"`'
        lines.append(f"| {target} | {row['packages']} | {row['disk_mb']:,} |")
    lines.append("")
    lines.append(
        f"Fresh venv per row, Python {data['python']} on {data['machine']}, torch {data['rows'][0]['torch']} "
        "(the CPU wheel; a CUDA build is larger and was not measured); packages counted by `pip list` (pip and "
        "setuptools included), disk "
        "is the venv's files. Measured by `python scripts/measure_extras.py`."
    )
    return "\n".join(lines)


def renderers() -> dict[str, Callable[[], str]]:
    """Every figures block name and the function that renders it."""
    table: dict[str, Callable[[], str]] = {f"run-{name}": render_run(name) for name in RUNS}
    table["digits-global-sentence"] = render_digits_global
    table["sweep-summary"] = render_sweep
    table["optuna"] = render_optuna
    table["naive-range"] = render_naive_range
    table["invariance-range"] = render_invariance_range
    table["extras"] = render_extras
    for path in MEASURE_TESTS:
        table["measured-" + Path(path).stem] = render_measured(path)
    return table


def plot_naive_vs_exact(out: Path = ROOT / "docs" / "naive-vs-exact.png") -> None:
    """Draw docs/naive-vs-exact.png from the invariance sweep's table (docs/invariance.md).

    One pair of bars per split: the final parameters' distance to the exact 1 x 1 x 16 run, naive and exact.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    distance = invariance_distances()
    splits = [label.removeprefix("exact ") for label in distance if label.startswith("exact ")]
    floor = 1e-9  # the reference split is at distance 0: drawn at the floor of the log scale
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.38
    for offset, mode, color in ((-width / 2, "naive", "tab:red"), (width / 2, "exact", "tab:green")):
        values = [max(distance[f"{mode} {split}"], floor) for split in splits]
        label = "naive Lightning" if mode == "naive" else "lightning-accum"
        ax.bar([i + offset for i in range(len(splits))], values, width, label=label, color=color)
    for i, split in enumerate(splits):
        if distance[f"exact {split}"] == 0:
            ax.text(i + width / 2, floor * 2, "0: the\nreference", ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(floor, 30)
    times = "\N{MULTIPLICATION SIGN}"
    ticks = [times.join(re.findall(r"\d+", split)) for split in splits]  # "2 ranks x K=4 x B=2" -> 2x4x2
    ax.set_xticks(range(len(splits)), ticks)
    ax.set_xlabel(f"ranks {times} K {times} micro-batch")
    ax.set_ylabel(f"distance to the 1{times}1{times}16 run\n(fraction of the update)")
    ax.set_title("Same 16 samples per optimizer step, split five ways (token LM, 3 epochs, AdamW)", fontsize=9)
    ax.legend(fontsize=8, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=110, metadata={"Software": None})
    plt.close(fig)


def rewrite(check: bool) -> list[Path]:
    """Re-render every page; return the pages that changed (with ``check``, only report them)."""
    stale = []
    table = renderers()
    for page in documents():
        text = page.read_text()
        fresh = render_text(text, table)
        if fresh != text:
            stale.append(page)
            if not check:
                page.write_text(fresh)
    return stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report pages that are out of date")
    parser.add_argument("--runs", action="store_true", help="re-run the example runs")
    parser.add_argument("--measure", action="store_true", help="re-run the tests that record figures")
    parser.add_argument("--extras", action="store_true", help="measure each install extra (fresh venvs)")
    parser.add_argument(
        "--invariance",
        type=Path,
        metavar="SWEEP_DIR",
        help="take invariance.md and invariance.png from this `scripts/train.py -m experiment=invariance` folder",
    )
    args = parser.parse_args()
    if args.invariance:
        take_invariance(args.invariance)
    if args.runs:
        runs: dict[str, object] = {name: run_app(overrides) for name, overrides in RUNS.items()}
        runs["sweep"] = run_sweep(SWEEP)
        runs["optuna"] = run_sweep(OPTUNA)
        save("runs", runs)
    if args.measure:
        MEASURED_FILE.unlink(missing_ok=True)
        env = {**os.environ, "LIGHTNING_ACCUM_MEASURED_OUT": str(MEASURED_FILE), "PYTHONPATH": str(ROOT)}
        subprocess.run([PYTHON, "-m", "pytest", "-q", *MEASURE_TESTS], check=True, cwd=ROOT, env=env)
    if args.extras:
        subprocess.run([PYTHON, str(ROOT / "scripts" / "measure_extras.py")], check=True, cwd=ROOT)
    if not args.check:
        plot_naive_vs_exact()
    stale = rewrite(check=args.check)
    for page in stale:
        print(f"{'out of date' if args.check else 'rewrote'}: {page.relative_to(ROOT)}")
    if args.check and stale:
        sys.exit("figures or included examples are out of date: run python scripts/refresh_figures.py")


if __name__ == "__main__":
    main()
