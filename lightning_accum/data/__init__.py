"""The data side: every optimizer step gets the same samples however its batch is split over ranks and K.

``GlobalBatchSampler`` cuts one global order into windows (``sampler``), optionally grouped by length
(``grouping``); ``GlobalBatchLoader`` delivers them and owns the resume position (``loader``);
``WindowSampler`` declares what the rescaler checks of such a sampler (``protocol``); ``checks`` warns about
train data that would change what the windows count.
"""

from lightning_accum.data.loader import GlobalBatchLoader
from lightning_accum.data.protocol import WindowSampler
from lightning_accum.data.sampler import PAD_INDEX, EpochPermutation, GlobalBatchSampler

__all__ = ["PAD_INDEX", "EpochPermutation", "GlobalBatchLoader", "GlobalBatchSampler", "WindowSampler"]
