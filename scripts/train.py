"""Train an example model with exact item-weighted gradient accumulation.

python scripts/train.py                                   # digits + MLP, K=4, CPU, about 6 s
python scripts/train.py data=tokens model=causal_lm accumulation=schedule
python scripts/train.py -m accumulation=none,fixed        # sweep; summary table + plot at the end
python scripts/train.py trainer=ddp_cpu                   # 2 processes on CPU
torchrun --nproc_per_node=2 scripts/train.py trainer=torchrun
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from lightning_accum_app.app import run_training
from lightning_accum_app.launch import prepare_process, process_rank


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run one job and return the metric named by ``optimized_metric`` (for sweepers)."""
    metrics = run_training(cfg)
    if process_rank(os.environ) == 0:
        print("\nFinal metrics:")
        for name, value in metrics.items():
            print(f"  {name:<20} {value:.6g}")
        print(f"Output folder: {os.path.abspath(cfg.paths.output_dir)}")
    return metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    prepare_process(sys.argv, os.environ)
    main()
