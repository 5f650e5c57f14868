"""Does the noise scale predict the critical batch? Steps and samples to a target loss against the global batch.

Each point is the Hydra app's ``experiment=critical_batch`` (digits, MLP, AdamW at a fixed learning rate,
``GlobalBatchSampler``, ``GradientNoiseScale``) with ``accumulation.k=K`` for micro-batches of 8 samples, and
one run with ``accumulation=noise_scale`` (K from 2, following the noise scale). Every optimizer step the full
training set's item-mean loss is evaluated; a run stops at the first step where it reaches the target. A fit of
McCandlish et al.'s ``S = S_min (1 + B_crit / B)`` (least squares of steps against 1/B) gives ``S_min``,
``B_crit`` and ``E_min = S_min * B_crit``; the smoothed ``B_simple`` of each run at the target is compared with
``B_crit``. Writes docs/figures/critical_batch.json and docs/figures/critical_batch.png.

    python scripts/critical_batch.py              # K = 1, 2, 4, 8, 16, 32 and noise_scale: a few minutes on a CPU
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from lightning_accum import GradientNoiseScale  # noqa: E402
from lightning_accum_app.app import build  # noqa: E402

KS = (1, 2, 4, 8, 16, 32)
MICRO_BATCH = 8
TARGET = 0.25  # item-mean cross entropy over the training set
OUT = ROOT / "docs" / "figures"
RUNS = Path(tempfile.gettempdir()) / "critical_batch"  # the runs write nothing there (no logger, no checkpoints)


class StopAtTarget(pl.Callback):
    """After every optimizer step: the training set's loss; stop at the first step that reaches ``TARGET``."""

    def __init__(self) -> None:
        self.samples = 0.0
        self.step = 0
        self.reached: dict[str, float] | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if self.reached is not None or trainer.global_step == self.step:
            return
        self.step = trainer.global_step
        self.samples += float(trainer.callback_metrics["train/items"])
        data = trainer.datamodule.train_set
        with torch.no_grad():
            loss = float(torch.nn.functional.cross_entropy(pl_module(data.x), data.y))
        if loss <= TARGET:
            noise = next(c for c in trainer.callbacks if isinstance(c, GradientNoiseScale))
            self.reached = {
                "steps": trainer.global_step,
                "samples": self.samples,
                "noise_scale": float(noise.noise_scale),
                "k": trainer.accumulate_grad_batches,
            }
            trainer.should_stop = True


def run(*overrides: str) -> dict[str, float]:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=critical_batch", f"paths.output_dir={RUNS}", *overrides])
    pl.seed_everything(cfg.seed, verbose=False)  # the same initial model for every point
    datamodule, model, trainer = build(cfg)
    stop = StopAtTarget()
    trainer.callbacks.append(stop)
    trainer.fit(model, datamodule=datamodule)
    if stop.reached is None:
        raise RuntimeError(f"{overrides}: the target loss {TARGET} was not reached in {trainer.max_epochs} epochs")
    return stop.reached


def fit_critical(points: list[dict[str, float]]) -> dict[str, float]:
    """Least squares of ``S = S_min + (S_min B_crit) / B`` over the fixed-K points."""
    x = torch.tensor([1.0 / p["batch"] for p in points], dtype=torch.float64)
    s = torch.tensor([p["steps"] for p in points], dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], dim=1)
    s_min, slope = torch.linalg.lstsq(design, s[:, None]).solution.flatten().tolist()
    return {"S_min": s_min, "B_crit": slope / s_min, "E_min": slope}


def main() -> None:
    points = []
    for k in KS:
        reached = run(f"accumulation.k={k}")
        points.append({"batch": k * MICRO_BATCH, **reached})
        print(points[-1], flush=True)
    follow = run("accumulation=noise_scale", "~callbacks.noise_scale")
    print("noise_scale", follow, flush=True)
    fitted = fit_critical(points)
    measured = [p["noise_scale"] for p in points if math.isfinite(p["noise_scale"])]
    median = sorted(measured)[len(measured) // 2]
    summary = {
        "target_loss": TARGET,
        "micro_batch": MICRO_BATCH,
        "points": points,
        "noise_scale_accumulation": follow,
        **fitted,
        "B_simple_median": median,
        "ratio_B_simple_to_B_crit": median / fitted["B_crit"],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "critical_batch.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "points"}, indent=1))
    draw(summary)


def draw(summary: dict) -> None:
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
    fig.savefig(OUT / "critical_batch.png", dpi=110)


if __name__ == "__main__":
    main()
