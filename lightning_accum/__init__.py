"""Exact item-weighted gradients for PyTorch Lightning under accumulation, DDP and mixed precision."""

from lightning_accum.callback import SampleCountRescaler
from lightning_accum.data import GlobalBatchLoader, GlobalBatchSampler
from lightning_accum.mixin import SampleCountMixin
from lightning_accum.noise_callback import GradientNoiseScale, NoiseScaleAccumulation

__all__ = [
    "GlobalBatchLoader",
    "GlobalBatchSampler",
    "GradientNoiseScale",
    "NoiseScaleAccumulation",
    "SampleCountMixin",
    "SampleCountRescaler",
]
