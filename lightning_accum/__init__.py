"""Exact item-weighted gradients for PyTorch Lightning under accumulation, DDP and mixed precision."""

from lightning_accum.callback import SampleCountRescaler
from lightning_accum.data import GlobalBatchLoader, GlobalBatchSampler
from lightning_accum.mixin import SampleCountMixin
from lightning_accum.noise_callback import GradientNoiseScale, NoiseScaleAccumulation
from lightning_accum.preemption import StepBoundaryRequeue

__version__ = "0.1.0"  # the one source of the version: pyproject.toml reads it (CHANGELOG.md says what changed)

__all__ = [
    "GlobalBatchLoader",
    "GlobalBatchSampler",
    "GradientNoiseScale",
    "NoiseScaleAccumulation",
    "SampleCountMixin",
    "SampleCountRescaler",
    "StepBoundaryRequeue",
    "__version__",
]
