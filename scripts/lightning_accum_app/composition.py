"""What the app decides from the composed configs: K's Trainer arguments and callbacks, and the data's wiring.

The demos' data modules describe their data (``num_features``, ``num_classes``, ``vocab``); the app turns that
into the model's arguments and the Trainer arguments a sampler needs, so none of this glue ships in the wheel.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler

from lightning_accum.demos import ExampleDataModule, TokenSequenceDataModule
from lightning_accum.demos.schedule import AccumulationK, normalize_k


class Accumulation:
    """Turn the configured K into consistent Trainer arguments and callbacks.

    An int K sets ``Trainer(accumulate_grad_batches=K)``. A mapping ``{epoch: K}`` adds a
    ``GradientAccumulationScheduler`` and leaves the Trainer's ``accumulate_grad_batches`` at 1 (the
    scheduler refuses anything else); it also rebuilds the train dataloader each epoch so a sampler
    that groups micro-batches into windows sees the new K.

    Example::

        >>> Accumulation(4).trainer_kwargs(), Accumulation(4).callbacks()
        ({'accumulate_grad_batches': 4}, [])
        >>> scheduled = Accumulation({0: 1, 2: 4})
        >>> scheduled.trainer_kwargs()
        {'accumulate_grad_batches': 1, 'reload_dataloaders_every_n_epochs': 1}
        >>> type(scheduled.callbacks()[0]).__name__
        'GradientAccumulationScheduler'
    """

    def __init__(self, k: AccumulationK = 1) -> None:
        self.k = normalize_k(k)

    def trainer_kwargs(self) -> dict[str, Any]:
        """Arguments this K fixes on the Trainer; the trainer config must not set them."""
        if isinstance(self.k, int):
            return {"accumulate_grad_batches": self.k}
        return {"accumulate_grad_batches": 1, "reload_dataloaders_every_n_epochs": 1}

    def callbacks(self) -> list[Callback]:
        """The scheduler callback for an epoch -> K mapping, none for a fixed K."""
        if isinstance(self.k, int):
            return []
        return [GradientAccumulationScheduler(scheduling=dict(self.k))]


def model_kwargs(datamodule: pl.LightningDataModule) -> dict[str, Any]:
    """The shape arguments the demo models need for this data module's data.

    Example::

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

    Example::

        >>> from lightning_accum.demos import RegressionDataModule
        >>> data_trainer_kwargs(RegressionDataModule(sampler="global")), data_trainer_kwargs(RegressionDataModule())
        ({'use_distributed_sampler': False}, {})
    """
    return {"use_distributed_sampler": False} if datamodule.sampler == "global" else {}
