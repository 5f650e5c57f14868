"""Packed rows: several documents per row with document-isolated attention, and a small attention LM for them.

``PackCollate`` packs a micro-batch's documents into rows (first fit, in order) and gives every token its
document's id within the row (``segments``) and its position within its document (``positions``).
``AttentionLM`` attends with a block-diagonal causal mask built from ``segments`` (a token sees the earlier tokens
of its own document only) and embeds ``positions``, so a packed document gets the same logits as the same document
alone in a padded row: packed and padded training follow the same trajectory, under the token mean
(``sample_loss(losses, mask)``) and the per-document mean (``sample_loss(losses, mask, segments=...)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_accum import SampleCountMixin
from lightning_accum.demos.models import OptimizerFactory, _default_optimizer
from lightning_accum.segments import document_losses


class PackCollate:
    """Pack ``[{"tokens", "valid"}, ...]`` into rows of at most ``row_length`` next-token targets.

    Returns ``input_ids``, ``targets``, ``mask`` (real target positions), ``segments`` (the document's index in
    its row; padding gets the next free index), ``positions`` (reset at every document), all ``[R, T]``, and
    ``valid`` ``[R]``. Placeholder samples (``"valid": False``) are left out; a micro-batch of placeholders only
    gives one row that counts nothing. ``T`` is the longest row's filled length.

    Examples:
        >>> collate = PackCollate(pad_id=0, row_length=6)
        >>> batch = collate([{"tokens": torch.tensor([1, 5, 6, 2]), "valid": torch.tensor(True)},
        ...                  {"tokens": torch.tensor([1, 7, 2]), "valid": torch.tensor(True)},
        ...                  {"tokens": torch.tensor([1, 9, 9, 9, 2]), "valid": torch.tensor(True)}])
        >>> batch["input_ids"]
        tensor([[1, 5, 6, 1, 7],
                [1, 9, 9, 9, 0]])
        >>> batch["segments"]
        tensor([[0, 0, 0, 1, 1],
                [0, 0, 0, 0, 1]])
        >>> batch["positions"]
        tensor([[0, 1, 2, 0, 1],
                [0, 1, 2, 3, 0]])
    """

    def __init__(self, pad_id: int, row_length: int) -> None:
        if row_length < 1:
            raise ValueError(f"row_length must be >= 1, got {row_length}.")
        self.pad_id, self.row_length = pad_id, row_length

    def __call__(self, samples: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        rows: list[list[Tensor]] = []
        filled: list[int] = []
        for sample in samples:
            tokens = sample["tokens"]
            size = len(tokens) - 1
            if not bool(sample["valid"]) or size < 1:
                continue
            if size > self.row_length:
                raise ValueError(
                    f"a document of {size} next-token targets does not fit a row of {self.row_length}; raise "
                    "row_length to the longest document (packing never splits a document)."
                )
            row = next((r for r, used in enumerate(filled) if used + size <= self.row_length), len(rows))
            if row == len(rows):
                rows.append([])
                filled.append(0)
            rows[row].append(tokens)
            filled[row] += size
        width = max(filled, default=1)
        shape = (max(len(rows), 1), width)
        batch = {
            "input_ids": torch.full(shape, self.pad_id, dtype=torch.long),
            "targets": torch.full(shape, self.pad_id, dtype=torch.long),
            "mask": torch.zeros(shape, dtype=torch.bool),
            "segments": torch.zeros(shape, dtype=torch.long),
            "positions": torch.zeros(shape, dtype=torch.long),
        }
        for r, documents in enumerate(rows):
            start = 0
            for index, tokens in enumerate(documents):
                end = start + len(tokens) - 1
                batch["input_ids"][r, start:end] = tokens[:-1]
                batch["targets"][r, start:end] = tokens[1:]
                batch["mask"][r, start:end] = True
                batch["segments"][r, start:end] = index
                batch["positions"][r, start:end] = torch.arange(end - start)
                start = end
            batch["segments"][r, start:] = len(documents)
        return batch | {"valid": torch.ones(shape[0], dtype=torch.bool)}


class AttentionLM(SampleCountMixin, pl.LightningModule):
    """A one-block causal self-attention next-token LM whose attention stays inside each document of a row.

    Batches from ``PadCollate`` (one document per row) or ``PackCollate`` (``segments`` and ``positions``). With
    ``document_mean`` every document weighs the same (``sample_loss(..., segments=batch["segments"])``, the
    per-document mean); otherwise every target token does.

    Args:
        vocab_size: number of token ids.
        pad_id: id of the padding token.
        dim: embedding width.
        heads: attention heads (``dim`` must divide by it).
        max_length: the longest document (positions embedded).
        document_mean: weigh documents, not tokens, equally.
        optimizer: ``params -> Optimizer``; AdamW(1e-3) if ``None``.

    Examples:
        >>> lm = AttentionLM(vocab_size=11, dim=8, heads=2)
        >>> alone = lm(torch.tensor([[3, 4, 5]]))                   # one document in its own row
        >>> packed = lm(torch.tensor([[7, 3, 4, 5]]), positions=torch.tensor([[0, 0, 1, 2]]),
        ...             segments=torch.tensor([[0, 1, 1, 1]]))     # after another document
        >>> torch.allclose(alone[0], packed[0, 1:], atol=1e-6)
        True
    """

    def __init__(
        self,
        vocab_size: int,
        pad_id: int = 0,
        dim: int = 32,
        heads: int = 4,
        max_length: int = 512,
        document_mean: bool = False,
        optimizer: OptimizerFactory | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.position = nn.Embedding(max_length, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab_size)
        self.heads, self.document_mean = heads, document_mean
        self.optimizer_factory = optimizer or _default_optimizer

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, segments: Tensor | None = None) -> Tensor:
        rows, width = input_ids.shape
        positions = torch.arange(width, device=input_ids.device).expand(rows, -1) if positions is None else positions
        segments = torch.zeros_like(input_ids) if segments is None else segments
        hidden = self.embed(input_ids) + self.position(positions)
        q, k, v = self.qkv(hidden).view(rows, width, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        causal = torch.ones(width, width, dtype=torch.bool, device=input_ids.device).tril()
        same_document = segments[:, :, None] == segments[:, None, :]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=(causal & same_document)[:, None])
        hidden = hidden + self.mix(attended.transpose(1, 2).reshape(rows, width, -1))
        return self.head(torch.tanh(hidden))

    def token_losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Per-token losses ``[R, T]`` and the mask of the target tokens that count."""
        logits = self(batch["input_ids"], batch.get("positions"), batch.get("segments"))
        losses = F.cross_entropy(logits.transpose(1, 2), batch["targets"], reduction="none")
        return losses, batch["mask"] & batch["valid"][:, None]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        losses, mask = self.token_losses(batch)
        return self.sample_loss(losses, mask, segments=self._segments(batch))

    def count_items(self, batch: dict[str, Tensor]) -> Tensor:
        """The items ``training_step`` counts: target tokens, or with ``document_mean`` documents."""
        mask = batch["mask"] & batch["valid"][:, None]
        segments = self._segments(batch)
        return mask.sum() if segments is None else document_losses(mask.float(), mask, segments)[1].sum()

    def _segments(self, batch: dict[str, Tensor]) -> Tensor | None:
        if not self.document_mean:
            return None
        return batch["segments"] if "segments" in batch else torch.zeros_like(batch["input_ids"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())
