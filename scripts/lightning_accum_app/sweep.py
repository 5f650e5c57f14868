"""``SweepSummary``: a Hydra callback that tabulates and plots every run of a ``-m`` sweep."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"


def load_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Read ``metrics.json`` and ``history.csv`` of every run folder under ``sweep_dir``."""
    runs = []
    for metrics_path in sorted(sweep_dir.glob(f"*/{METRICS_FILE}"), key=lambda p: (len(p.parent.name), p.parent.name)):
        run = json.loads(metrics_path.read_text())
        run["dir"] = metrics_path.parent.name
        history_path = metrics_path.parent / HISTORY_FILE
        run["history"] = []
        if history_path.exists():
            with history_path.open() as f:
                run["history"] = [(float(r["items_seen"]), float(r["loss"])) for r in csv.DictReader(f)]
        runs.append(run)
    return runs


def label_runs(runs: list[dict[str, Any]]) -> list[str]:
    """Label each run by the overrides that differ between runs; return the overrides all runs share.

    Examples:
        >>> runs = [{"overrides": ["k=1", "epochs=1"]}, {"overrides": ["k=2", "epochs=1"]}]
        >>> label_runs(runs), [run["label"] for run in runs]
        (['epochs=1'], ['k=1', 'k=2'])
    """
    shared = [o for o in runs[0]["overrides"] if all(o in run["overrides"] for run in runs)] if len(runs) > 1 else []
    for run in runs:
        run["label"] = " ".join(o for o in run["overrides"] if o not in shared) or "defaults"
    return shared


def summary_rows(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary: run folder, label (see ``label_runs``), items of the first optimizer step
    (the global batch, K x micro-batch x ranks, where each sample is one item), items seen, every final metric.

    Examples:
        >>> header, rows = summary_rows([{"dir": "0", "label": "a=1", "metrics": {"val/loss": 0.5},
        ...                               "history": [(4.0, 0.9), (8.0, 0.7)]}])
        >>> header, rows
        (['run', 'overrides', 'first_step_items', 'items_seen', 'val/loss'], [['0', 'a=1', '4', '8', '0.5']])
    """
    names = sorted({name for run in runs for name in run["metrics"]})
    header = ["run", "overrides", "first_step_items", "items_seen", *names]
    rows = []
    for run in runs:
        first, last = (f"{run['history'][i][0]:.0f}" for i in (0, -1)) if run["history"] else ("", "")
        values = [f"{run['metrics'][n]:.6g}" if n in run["metrics"] else "" for n in names]
        rows.append([run["dir"], run["label"], first, last, *values])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """Render a Markdown table.

    Examples:
        >>> print(markdown_table(["a", "b"], [["1", "2"]]))
        | a | b |
        |---|---|
        | 1 | 2 |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot_loss_vs_items(runs: list[dict[str, Any]], path: Path) -> None:
    """Save a PNG of training loss against items seen, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        if run["history"]:
            items, losses = zip(*run["history"], strict=True)
            ax.plot(items, losses, label=f"{run['dir']}: {run['label']}")
    ax.set_xlabel("items seen")
    ax.set_ylabel("training loss (item mean per optimizer step)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class SweepSummary(Callback):
    """At the end of a multirun write ``summary.csv``, ``summary.md`` and ``loss_vs_items.png`` to the sweep folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = load_runs(sweep_dir)
        if not runs:
            return
        shared = label_runs(runs)
        header, rows = summary_rows(runs)
        with (sweep_dir / "summary.csv").open("w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
        table = markdown_table(header, rows)
        (sweep_dir / "summary.md").write_text(table + "\n")
        plot_loss_vs_items(runs, sweep_dir / "loss_vs_items.png")
        common = f" (all runs: {' '.join(shared)})" if shared else ""
        print(f"\nSweep summary of {len(runs)} runs{common}:\n{table}\n\nWritten to {sweep_dir}")
