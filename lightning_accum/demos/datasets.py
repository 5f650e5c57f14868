"""Map-style datasets of dict samples that also accept the padding index ``-1``.

A real sample carries ``"valid": True``. Through ``GlobalBatchLoader`` a dataset never sees ``-1`` (the loader
fetches a real sample for a padding micro-batch and the rescaler counts it as nothing), so ``valid`` is always
true there. For loops that hand ``GlobalBatchSampler``'s indices to the dataset directly, index ``-1`` returns
a placeholder of the same shapes with ``"valid": False``, which example models mask out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_accum.data.sampler import PAD_INDEX


class FeatureDataset(Dataset):
    """Pairs of feature vectors ``x`` and targets ``y``, one dict per sample.

    Examples:
        >>> ds = FeatureDataset(torch.ones(3, 2), torch.tensor([0, 1, 2]))
        >>> ds[1]["y"], ds[1]["valid"]
        (tensor(1), tensor(True))
        >>> pad = ds[-1]
        >>> pad["x"], pad["y"], pad["valid"]
        (tensor([0., 0.]), tensor(0), tensor(False))
    """

    def __init__(self, x: Tensor, y: Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y must hold the same number of samples, got {len(x)} and {len(y)}.")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if index == PAD_INDEX:
            return {"x": torch.zeros_like(self.x[0]), "y": torch.zeros_like(self.y[0]), "valid": torch.tensor(False)}
        return {"x": self.x[index], "y": self.y[index], "valid": torch.tensor(True)}


class TokenSequenceDataset(Dataset):
    """Variable-length token sequences, one dict ``{"tokens": LongTensor[L], "valid": bool}`` per sample.

    The placeholder for index ``-1`` is two ``pad_id`` tokens (one next-token target).

    Examples:
        >>> ds = TokenSequenceDataset([torch.tensor([1, 5, 6, 2]), torch.tensor([1, 7, 2])], pad_id=0)
        >>> ds[1]
        {'tokens': tensor([1, 7, 2]), 'valid': tensor(True)}
        >>> ds[-1]
        {'tokens': tensor([0, 0]), 'valid': tensor(False)}
    """

    def __init__(self, sequences: Sequence[Tensor], pad_id: int) -> None:
        short = [len(s) for s in sequences if len(s) < 2]
        if short:
            raise ValueError(f"every sequence needs at least 2 tokens (one next-token target), got lengths {short}.")
        self.sequences = list(sequences)
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.sequences)

    def lengths(self) -> list[int]:
        """Each sample's padded width after ``PadCollate``: its number of next-token targets, ``len(tokens) - 1``.

        Examples:
            >>> TokenSequenceDataset([torch.tensor([1, 5, 6, 2]), torch.tensor([1, 7, 2])], pad_id=0).lengths()
            [3, 2]
        """
        return [len(sequence) - 1 for sequence in self.sequences]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if index == PAD_INDEX:
            return {"tokens": torch.full((2,), self.pad_id, dtype=torch.long), "valid": torch.tensor(False)}
        return {"tokens": self.sequences[index], "valid": torch.tensor(True)}
