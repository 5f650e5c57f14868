"""Does the noise scale predict the critical batch? Steps and samples to a target loss against the global batch.

Two Hydra multiruns of the app (``scripts/train.py``) give the points: ``-m experiment=critical_batch
accumulation.k=1,2,4,8,16,32`` (digits, MLP, AdamW at a fixed learning rate, ``GlobalBatchSampler``,
``GradientNoiseScale``, micro-batches of 8) and ``-m experiment=critical_batch accumulation=noise_scale`` (K from
2, following the noise scale). In every run ``StopAtTarget`` evaluates the full training set's item-mean loss
after each optimizer step, stops at the first step that reaches the target and writes ``target.json`` into the
run folder. This script then reads the run folders, fits McCandlish et al.'s ``S = S_min (1 + B_crit / B)``
(least squares of steps against 1/B) for ``S_min``, ``B_crit`` and ``E_min = S_min * B_crit``, compares the
smoothed ``B_simple`` of each run at the target with ``B_crit``, and writes docs/figures/critical_batch.json and
docs/figures/critical_batch.png.

    python scripts/critical_batch.py                    # both sweeps, the fit and the figure: minutes on a CPU
    python scripts/critical_batch.py --reuse            # the fit and the figure from the last sweeps' folders
    python scripts/critical_batch.py --ks 2,4 --runs /tmp/cb --out /tmp/cb callbacks.stop_at_target.target=1.0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"
KS = (1, 2, 4, 8, 16, 32)
OUT = ROOT / "docs" / "figures"
RUNS = Path(tempfile.gettempdir()) / "critical_batch"  # the sweeps' folders: fixed/<job>, noise_scale/<job>


def sweep(folder: Path, overrides: list[str]) -> None:
    """``python scripts/train.py -m experiment=critical_batch *overrides`` with its runs under ``folder``."""
    command = [sys.executable, str(TRAIN), "-m", "experiment=critical_batch", *overrides, f"hydra.sweep.dir={folder}"]
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=folder.parent, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def read_points(folder: Path) -> list[dict[str, float]]:
    """Every run of a sweep folder: its ``target.json`` and its global batch (K x micro-batch x ranks, each
    sample one item) from the run's composed config, in the order of the batch."""
    points = []
    for path in sorted(folder.glob("*/target.json")):
        reached = json.loads(path.read_text())
        if not reached["reached"]:
            raise RuntimeError(f"{path.parent}: the target loss {reached['target']} was not reached")
        cfg = OmegaConf.load(path.parent / ".hydra" / "config.yaml")
        devices = cfg.trainer.get("devices", 1)
        ranks = int(devices) if str(devices).isdigit() else 1
        batch = reached["k"] * cfg.data.micro_batch_size * ranks
        points.append({"batch": batch, **{k: v for k, v in reached.items() if k not in ("reached", "target")}})
    if not points:
        raise FileNotFoundError(f"no run folder with target.json under {folder}")
    return sorted(points, key=lambda p: p["batch"])


def fit_critical(points: list[dict[str, float]]) -> dict[str, float]:
    """Least squares of ``S = S_min + (S_min B_crit) / B`` over the fixed-K points."""
    x = torch.tensor([1.0 / p["batch"] for p in points], dtype=torch.float64)
    s = torch.tensor([p["steps"] for p in points], dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], dim=1)
    s_min, slope = torch.linalg.lstsq(design, s[:, None]).solution.flatten().tolist()
    return {"S_min": s_min, "B_crit": slope / s_min, "E_min": slope}


def summarize(points: list[dict[str, float]], follow: dict[str, float], target: float) -> dict:
    """The fit, the median smoothed ``B_simple`` at the target over the fixed-K runs and its ratio to ``B_crit``."""
    fitted = fit_critical(points)
    measured = sorted(p["noise_scale"] for p in points if math.isfinite(p["noise_scale"]))
    median = measured[len(measured) // 2] if measured else float("nan")
    return {
        "target_loss": target,
        "points": points,
        "noise_scale_accumulation": follow,
        **fitted,
        "B_simple_median": median,
        "ratio_B_simple_to_B_crit": median / fitted["B_crit"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default=",".join(map(str, KS)), help="the fixed-K sweep's K values")
    parser.add_argument("--runs", type=Path, default=RUNS, help="where the sweeps write their run folders")
    parser.add_argument("--out", type=Path, default=OUT, help="where critical_batch.json and .png go")
    parser.add_argument("--reuse", action="store_true", help="read the run folders of earlier sweeps, run none")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides added to both sweeps")
    args = parser.parse_args(argv)
    fixed, follow = args.runs / "fixed", args.runs / "noise_scale"
    if not args.reuse:
        args.runs.mkdir(parents=True, exist_ok=True)
        sweep(fixed, [f"accumulation.k={args.ks}", *args.overrides])
        sweep(follow, ["accumulation=noise_scale", "~callbacks.noise_scale", *args.overrides])
    points = read_points(fixed)
    (followed,) = read_points(follow)
    target = json.loads(next(fixed.glob("*/target.json")).read_text())["target"]
    summary = summarize(points, followed, target)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "critical_batch.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "points"}, indent=1))
    draw(summary, args.out / "critical_batch.png")
    return summary


def draw(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = summary["points"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot([p["samples"] for p in points], [p["steps"] for p in points], "o-", label="fixed K")
    for p in points:
        ax.annotate(f"B={p['batch']}", (p["samples"], p["steps"]), fontsize=8, textcoords="offset points",
                    xytext=(4, 4))  # fmt: skip
    s_min, e_min, b_crit = summary["S_min"], summary["E_min"], summary["B_crit"]
    batches = torch.logspace(0, math.log10(4 * points[-1]["batch"]), 100, dtype=torch.float64)
    ax.plot(e_min * (1 + batches / b_crit), s_min * (1 + b_crit / batches), ":", color="gray",
            label=f"fit: S_min={s_min:.0f}, E_min={e_min:.0f}, B_crit={b_crit:.0f}")  # fmt: skip
    follow = summary["noise_scale_accumulation"]
    ax.plot([follow["samples"]], [follow["steps"]], "s", color="C2", label="accumulation=noise_scale")
    b_simple = summary["B_simple_median"]
    ax.plot([e_min * (1 + b_simple / b_crit)], [s_min * (1 + b_crit / b_simple)], "*", ms=14, color="C3",
            label=f"measured B_simple={b_simple:.0f} on the fit")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("samples to target (E)")
    ax.set_ylabel("optimizer steps to target (S)")
    ax.set_title(f"digits MLP, AdamW, train loss <= {summary['target_loss']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
