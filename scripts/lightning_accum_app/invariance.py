"""The ``experiment=invariance`` sweep: snapshot each run's parameters, then compare the runs of the sweep.

``ParameterSnapshot`` (a Lightning callback) writes ``parameters.pt`` with the initial and final flat
parameters of a run. ``InvarianceSummary`` (a Hydra callback) reads every run of the sweep and writes
``invariance.md`` (each run's final-parameter distance to the reference run, as a fraction of the
reference's whole update) and ``invariance.png`` (training loss against items seen, and its gap per step
to the reference run's loss).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.experimental.callback import Callback as HydraCallback
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch import Tensor

from lightning_accum_app.sweep import load_runs, markdown_table

PARAMETERS_FILE = "parameters.pt"


def flat_parameters(module: torch.nn.Module) -> Tensor:
    """All parameters of ``module`` as one detached float64 vector on the CPU.

    Examples:
        >>> flat_parameters(torch.nn.Linear(2, 1)).shape  # 2 weights and a bias
        torch.Size([3])
    """
    return torch.cat([p.detach().reshape(-1).to("cpu", torch.float64) for p in module.parameters()])


class ParameterSnapshot(Callback):
    """Rank 0 writes ``{"initial": ..., "final": ...}`` flat parameter vectors to ``path`` at the end of fit."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._initial: Tensor | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._initial = flat_parameters(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"initial": self._initial, "final": flat_parameters(pl_module)}, self.path)


@dataclass
class SweepRun:
    """One run of the sweep: its label, ``(items seen, loss)`` history and parameter snapshot."""

    label: str
    exact: bool
    split: tuple[int, int, int] | None
    history: list[tuple[float, float]]
    initial: Tensor
    final: Tensor


def describe(overrides: list[str]) -> tuple[str, bool, tuple[int, int, int] | None]:
    """Label, exactness and ``(ranks, K, micro-batch)`` of a run from its Hydra overrides.

    Examples:
        >>> describe(["split=2x4x2", "mode=naive"])
        ('naive 2 ranks x K=4 x B=2', False, (2, 4, 2))
        >>> describe(["mode=exact"])
        ('exact', True, None)
    """
    values = dict(o.split("=", 1) for o in overrides if "=" in o)
    exact = values.get("mode", "exact") == "exact"
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)", values.get("split", ""))
    if match is None:
        return ("exact" if exact else "naive"), exact, None
    ranks, k, b = (int(g) for g in match.groups())
    label = f"{'exact' if exact else 'naive'} {ranks} rank{'s' * (ranks > 1)} x K={k} x B={b}"
    return label, exact, (ranks, k, b)


def load_sweep(sweep_dir: Path) -> list[SweepRun]:
    """Every run under ``sweep_dir`` that wrote a parameter snapshot."""
    runs = []
    for run in load_runs(sweep_dir):
        path = sweep_dir / run["dir"] / PARAMETERS_FILE
        if not path.exists():
            continue
        snapshot = torch.load(path)
        label, exact, split = describe(run["overrides"])
        runs.append(SweepRun(label, exact, split, run["history"], snapshot["initial"], snapshot["final"]))
    return runs


def reference_run(runs: list[SweepRun]) -> SweepRun:
    """The exact run with the fewest ranks and micro-batches per step (1 x 1 x E if swept), else the first."""
    exact = [run for run in runs if run.exact and run.split is not None]
    return min(exact, key=lambda run: run.split[0] * run.split[1]) if exact else runs[0]


def relative_distance(run: SweepRun, reference: SweepRun) -> float:
    """``|theta - theta_ref| / |theta_ref - theta_0|``: the gap as a fraction of the reference's whole update.

    Examples:
        >>> ref = SweepRun("ref", True, None, [], torch.zeros(2), torch.tensor([3.0, 4.0]))
        >>> round(relative_distance(SweepRun("b", True, None, [], torch.zeros(2), torch.tensor([3.0, 4.5])), ref), 6)
        0.1
    """
    return float((run.final - reference.final).norm() / (reference.final - reference.initial).norm())


def distance_table(runs: list[SweepRun], reference: SweepRun) -> str:
    """Markdown table of each run's final-parameter distance to ``reference`` and its last training loss."""
    rows = [
        [run.label, f"{relative_distance(run, reference):.2e}", f"{run.history[-1][1]:.4f}" if run.history else ""]
        for run in runs
    ]
    return markdown_table(["run", f"distance to `{reference.label}`", "last step's training loss"], rows)


def coinciding(runs: list[SweepRun], tolerance: float = 1e-5) -> list[list[str]]:
    """Labels of the runs whose loss curves coincide (every step within ``tolerance``), groups of two or more.

    Examples:
        >>> import torch
        >>> run = lambda label, losses: SweepRun(label, True, None, list(enumerate(losses)), torch.zeros(1),
        ...                                      torch.zeros(1))
        >>> coinciding([run("a", [2.0, 1.0]), run("b", [2.0, 1.0 + 1e-7]), run("c", [2.0, 1.5])])
        [['a', 'b']]
    """
    groups: list[list[SweepRun]] = []
    for run in runs:
        for group in groups:
            first = group[0].history
            if len(first) == len(run.history) and all(
                abs(a[1] - b[1]) <= tolerance * max(1.0, abs(a[1])) for a, b in zip(first, run.history, strict=True)
            ):
                group.append(run)
                break
        else:
            groups.append([run])
    return [[run.label for run in group] for group in groups if len(group) > 1]


def plot_invariance(runs: list[SweepRun], reference: SweepRun, path: Path, title: str = "") -> None:
    """Save the PNG: training loss against items seen (left) and its gap to ``reference``'s loss per step (right).

    Exact runs are solid, drawn thick to thin so that coinciding lines stay visible; naive runs are dashed. The
    plot says which runs coincide (their lines lie on top of each other).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gap_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    exact = [run for run in runs if run.exact and run.history]
    naive = [run for run in runs if not run.exact and run.history]
    styles = [
        (run, {"lw": 6.0 - 5.0 * i / max(1, len(exact) - 1), "color": plt.cm.winter(i / max(1, len(exact) - 1))})
        for i, run in enumerate(exact)
    ]
    styles += [
        (run, {"lw": 1.2, "ls": "--", "color": plt.cm.autumn(i / max(1, len(naive)))}) for i, run in enumerate(naive)
    ]
    ref_losses = [loss for _, loss in reference.history]
    for run, style in styles:
        items, losses = zip(*run.history, strict=True)
        ax.plot(items, losses, label=run.label, **style)
        if run is not reference:
            steps = min(len(losses), len(ref_losses))
            gaps = [max(abs(a - b), 1e-9) for a, b in zip(losses[:steps], ref_losses[:steps], strict=True)]
            gap_ax.plot(items[:steps], gaps, **{**style, "lw": min(style["lw"], 2.0)})
    ax.set_xlabel("items seen (target tokens, all ranks)")
    ax.set_ylabel("training loss (item mean per optimizer step)")
    ax.legend(fontsize=7, ncol=2)
    for i, group in enumerate(coinciding([run for run, _ in styles])):
        note = f"{len(group)} runs coincide (loss within 1e-5 at every step), drawn on top of each other, thick to thin"
        ax.text(0.01, 0.02 + 0.06 * i, note, transform=ax.transAxes, fontsize=7, va="bottom")
    gap_ax.set_yscale("log")
    gap_ax.set_xlabel("items seen (target tokens, all ranks)")
    gap_ax.set_ylabel(f"|loss - loss of {reference.label}| per step (0 drawn at 1e-9)", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class InvarianceSummary(HydraCallback):
    """At the end of the sweep write ``invariance.md`` and ``invariance.png`` to the sweep folder.

    Args:
        title: title of the plot.
    """

    def __init__(self, title: str = "") -> None:
        self.title = title

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = load_sweep(sweep_dir)
        if not runs:
            return
        reference = reference_run(runs)
        table = distance_table(runs, reference)
        (sweep_dir / "invariance.md").write_text(table + "\n")
        plot_invariance(runs, reference, sweep_dir / "invariance.png", self.title)
        print(f"\nFinal-parameter distances ({len(runs)} runs):\n{table}\n\nWritten to {sweep_dir}")
