"""What the app decides from the composed configs: K's Trainer arguments and callbacks, and the data's wiring.

The demos' data modules describe their data (``num_features``, ``num_classes``, ``vocab``); the app turns that
into the model's arguments and the Trainer arguments a sampler needs, so none of this glue ships in the wheel.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler

from lightning_accum import GradientNoiseScale, NoiseScaleAccumulation
from lightning_accum.demos import ExampleDataModule, TokenSequenceDataModule
from lightning_accum.demos.schedule import AccumulationK, normalize_k


class Accumulation:
    """Turn the configured K into consistent Trainer arguments and callbacks.

    An int K sets ``Trainer(accumulate_grad_batches=K)``. A mapping ``{epoch: K}`` adds a
    ``GradientAccumulationScheduler`` and leaves the Trainer's ``accumulate_grad_batches`` at 1 (the
    scheduler refuses anything else); it also rebuilds the train dataloader each epoch so a sampler
    that groups micro-batches into windows sees the new K. ``k=None`` with ``noise_scale={"min_k", "max_k",
    "smoothing"}`` lets K follow the gradient noise scale (``GradientNoiseScale`` and ``NoiseScaleAccumulation``);
    the data module then reads the Trainer's K each epoch.

    Examples:
        >>> Accumulation(4).trainer_kwargs(), Accumulation(4).callbacks()
        ({'accumulate_grad_batches': 4}, [])
        >>> scheduled = Accumulation({0: 1, 2: 4})
        >>> scheduled.trainer_kwargs()
        {'accumulate_grad_batches': 1, 'reload_dataloaders_every_n_epochs': 1}
        >>> type(scheduled.callbacks()[0]).__name__
        'GradientAccumulationScheduler'
        >>> following = Accumulation(None, noise_scale={"min_k": 2, "max_k": 16, "smoothing": 0.9})
        >>> following.trainer_kwargs()
        {'accumulate_grad_batches': 2, 'reload_dataloaders_every_n_epochs': 1}
        >>> [type(c).__name__ for c in following.callbacks()]
        ['GradientNoiseScale', 'NoiseScaleAccumulation']
    """

    def __init__(self, k: AccumulationK | None = 1, noise_scale: dict[str, Any] | None = None) -> None:
        if (k is None) == (noise_scale is None):
            raise ValueError("Set either `k` (an int or an epoch -> K mapping) or `noise_scale` with k=None.")
        self.k = None if k is None else normalize_k(k)
        self.noise_scale = None if noise_scale is None else dict(noise_scale)

    def trainer_kwargs(self) -> dict[str, Any]:
        """Arguments this K fixes on the Trainer; the trainer config must not set them."""
        if self.noise_scale is not None:
            return {"accumulate_grad_batches": self.noise_scale["min_k"], "reload_dataloaders_every_n_epochs": 1}
        if isinstance(self.k, int):
            return {"accumulate_grad_batches": self.k}
        return {"accumulate_grad_batches": 1, "reload_dataloaders_every_n_epochs": 1}

    def callbacks(self) -> list[Callback]:
        """The scheduler callback for an epoch -> K mapping, none for a fixed K; the noise-scale pair."""
        if self.noise_scale is not None:
            follow = self.noise_scale
            return [
                GradientNoiseScale(smoothing=follow.get("smoothing", 0.99)),
                NoiseScaleAccumulation(min_k=follow["min_k"], max_k=follow["max_k"]),
            ]
        if isinstance(self.k, int):
            return []
        assert self.k is not None
        return [GradientAccumulationScheduler(scheduling=dict(self.k))]


def model_kwargs(datamodule: pl.LightningDataModule) -> dict[str, Any]:
    """The shape arguments the demo models need for this data module's data.

    Examples:
        >>> from lightning_accum.demos import RegressionDataModule
        >>> model_kwargs(RegressionDataModule(num_features=4))
        {'in_features': 4, 'out_features': 1, 'task': 'regression'}
    """
    if isinstance(datamodule, TokenSequenceDataModule):
        return {"vocab_size": len(datamodule.vocab), "pad_id": datamodule.vocab.pad_id}
    if datamodule.num_classes is None:
        return {"in_features": datamodule.num_features, "out_features": 1, "task": "regression"}
    return {"in_features": datamodule.num_features, "out_features": datamodule.num_classes, "task": "classification"}


def data_trainer_kwargs(datamodule: ExampleDataModule) -> dict[str, Any]:
    """Trainer arguments the data module's loaders need: Lightning must not wrap the global sampler.

    Examples:
        >>> from lightning_accum.demos import RegressionDataModule
        >>> data_trainer_kwargs(RegressionDataModule(sampler="global")), data_trainer_kwargs(RegressionDataModule())
        ({'use_distributed_sampler': False}, {})
    """
    return {"use_distributed_sampler": False} if datamodule.sampler == "global" else {}
