"""Per-document means in packed rows: each (row, document) of a packed batch becomes one item.

A packed row holds several documents; ``segments`` gives each token its document's id within the row. The
"per-sequence" normalisation weighs every document the same, whatever its length: each (row, document) is one
item whose loss is its mean token loss, and the step's gradient is the mean over the window's documents, on all
ranks. Token-mean (``sample_loss(token_losses, mask)``) stays the default.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_accum.counting import count_dtype, require_shape_of, validate_item_losses


def document_losses(token_losses: Tensor, mask: Tensor | None, segments: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``(loss per document slot, mask of the slots that hold a counted token)``, both ``(rows, T)``.

    ``token_losses`` is ``(rows..., T)``; ``segments``, integers of the same shape in ``[0, T)``, says which
    document of its row each token belongs to (ids need not be contiguous or ordered). Slot ``d`` of a row holds
    the mean loss over that row's counted tokens of document ``d``; a document without counted tokens is masked
    out. No host synchronisation: the id range check is queued on the device.

    Examples:
        >>> losses = torch.tensor([[1.0, 3.0, 5.0, 0.0], [2.0, 2.0, 4.0, 6.0]])
        >>> segments = torch.tensor([[0, 0, 1, 2], [0, 1, 1, 1]])
        >>> mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
        >>> per_document, counted = document_losses(losses, mask, segments)
        >>> per_document[counted]                   # documents (0, 0), (0, 1), (1, 0), (1, 1)
        tensor([2., 5., 2., 4.])
    """
    validate_item_losses(token_losses, mask)
    require_shape_of(token_losses, "segments", segments, "one document id per token")
    if segments.is_floating_point() or segments.is_complex() or segments.dtype == torch.bool:
        raise TypeError(f"segments must hold integer document ids, got dtype {segments.dtype}.")
    length = token_losses.shape[-1]
    torch._assert_async(
        ((segments >= 0) & (segments < length)).all(),
        "segments must hold document ids in [0, row length) (the document's index within its row)",
    )
    losses = token_losses.reshape(-1, length)
    ids = segments.reshape(-1, length).long()
    counted = torch.ones_like(losses, dtype=torch.bool) if mask is None else mask.reshape(-1, length).bool()
    sum_dtype = torch.promote_types(losses.dtype, torch.float32)
    zero = torch.zeros((), dtype=sum_dtype, device=losses.device)
    token_sums = torch.where(counted, losses.to(sum_dtype), zero)
    sums = torch.zeros_like(token_sums).scatter_add(1, ids, token_sums)
    dtype = count_dtype(losses.device)
    tokens = torch.zeros(ids.shape, dtype=dtype, device=losses.device).scatter_add(1, ids, counted.to(dtype))
    return sums / tokens.clamp_min(1).to(sum_dtype), tokens > 0
