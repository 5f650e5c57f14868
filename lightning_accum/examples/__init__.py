"""Example data modules, models and Hydra-app helpers for ``scripts/train.py``.

The library core never imports this subpackage. Every dataset here follows the padding contract of
``lightning_accum.GlobalBatchSampler``: index ``-1`` returns a placeholder sample with
``"valid": False``, and every example model ANDs ``batch["valid"]`` into its loss mask.
"""

from lightning_accum.examples.accumulation import Accumulation
from lightning_accum.examples.datamodules import (
    DigitsDataModule,
    ExampleDataModule,
    RegressionDataModule,
    TokenSequenceDataModule,
)
from lightning_accum.examples.models import CausalLM, MLPModel

__all__ = [
    "Accumulation",
    "CausalLM",
    "DigitsDataModule",
    "ExampleDataModule",
    "MLPModel",
    "RegressionDataModule",
    "TokenSequenceDataModule",
]
