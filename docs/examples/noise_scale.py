"""The gradient noise scale of a run from exact item counts: GradientNoiseScale beside the rescaler.

One process with K = 4: the small batch is each window's first micro-batch (the last micro-batch of
an epoch is shorter, and the estimate knows it); the big batch is the window. Runs on a CPU in
seconds.
"""

from functools import partial

import lightning.pytorch as pl
import torch

from lightning_accum import GradientNoiseScale, SampleCountRescaler
from lightning_accum.demos import MLPModel, RegressionDataModule

data = RegressionDataModule(num_samples=997, num_features=8, noise=0.5, micro_batch_size=8)
frozen = partial(
    torch.optim.SGD, lr=0.0
)  # frozen weights: the estimate settles on one model's noise scale
model = MLPModel(in_features=8, out_features=1, task="regression", optimizer=frozen)
noise = GradientNoiseScale(smoothing=0.95)
trainer = pl.Trainer(
    max_epochs=3,
    accumulate_grad_batches=4,
    callbacks=[SampleCountRescaler(), noise],
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    limit_val_batches=0,
)
trainer.fit(model, datamodule=data)
logged = {
    k: round(float(v), 3)
    for k, v in trainer.callback_metrics.items()
    if k.startswith("train/noise")
}
print(logged)
print(f"B_simple = {logged['train/noise_scale']:.1f} items; this run's steps hold {4 * 8} items")
