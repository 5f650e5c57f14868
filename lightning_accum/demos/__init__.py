"""Demo models, datasets and data modules with per-item losses (as ``lightning.pytorch.demos`` is Lightning's).

They need no Hydra: ``scripts/train.py`` composes them from ``conf/``, and tests and benchmarks use them
directly. The library core never imports this subpackage. The data modules pad through ``GlobalBatchLoader``
(a padding micro-batch is a real sample that the rescaler counts as nothing); the datasets also accept the
padding index ``-1`` of loops without the loader (a placeholder with ``"valid": False``), and every example
model ANDs ``batch["valid"]`` into its loss mask.
"""

from lightning_accum.demos.datamodules import (
    DigitsDataModule,
    ExampleDataModule,
    RegressionDataModule,
    TokenSequenceDataModule,
)
from lightning_accum.demos.models import CausalLM, MLPModel
from lightning_accum.demos.packing import AttentionLM, PackCollate

__all__ = [
    "AttentionLM",
    "CausalLM",
    "DigitsDataModule",
    "ExampleDataModule",
    "MLPModel",
    "PackCollate",
    "RegressionDataModule",
    "TokenSequenceDataModule",
]
