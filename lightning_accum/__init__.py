"""Exact item-weighted gradients for PyTorch Lightning under accumulation, DDP and mixed precision."""

from lightning_accum.callback import SampleCountRescaler
from lightning_accum.loader import GlobalBatchLoader
from lightning_accum.mixin import SampleCountMixin
from lightning_accum.sampler import GlobalBatchSampler

__all__ = ["GlobalBatchLoader", "GlobalBatchSampler", "SampleCountMixin", "SampleCountRescaler"]
