"""Collate variable-length token sequences into padded next-token batches with a per-token mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class PadCollate:
    """Turn ``[{"tokens", "valid"}, ...]`` into ``input_ids``, ``targets``, ``mask`` ``[B, T]`` and ``valid`` ``[B]``.

    ``input_ids`` are the tokens without the last, ``targets`` the tokens without the first; both are
    right-padded with ``pad_id``. ``mask`` is ``True`` on the real target positions.

    Examples:
        >>> collate = PadCollate(pad_id=0)
        >>> batch = collate([{"tokens": torch.tensor([1, 5, 6, 2]), "valid": torch.tensor(True)},
        ...                  {"tokens": torch.tensor([1, 7, 2]), "valid": torch.tensor(True)}])
        >>> batch["input_ids"]
        tensor([[1, 5, 6],
                [1, 7, 0]])
        >>> batch["targets"]
        tensor([[5, 6, 2],
                [7, 2, 0]])
        >>> batch["mask"]
        tensor([[ True,  True,  True],
                [ True,  True, False]])
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, samples: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        lengths = torch.tensor([len(s["tokens"]) - 1 for s in samples])
        width = int(lengths.max())
        input_ids = torch.full((len(samples), width), self.pad_id, dtype=torch.long)
        targets = torch.full_like(input_ids, self.pad_id)
        for row, sample in enumerate(samples):
            tokens = sample["tokens"]
            input_ids[row, : len(tokens) - 1] = tokens[:-1]
            targets[row, : len(tokens) - 1] = tokens[1:]
        mask = torch.arange(width)[None, :] < lengths[:, None]
        valid = torch.stack([s["valid"] for s in samples])
        return {"input_ids": input_ids, "targets": targets, "mask": mask, "valid": valid}
