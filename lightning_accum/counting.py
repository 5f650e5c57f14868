"""Count the items of one micro-batch: the sum of the counted item losses and how many items count.

The mask the loss uses is the only source of the count, so the two cannot drift apart. With per-item weights
``w`` the sum is ``sum(w * loss)`` and the count ``sum(w)`` over the counted items: every formula downstream
(the window's mean, the rescale, the logs) then gives the weighted mean ``sum(w * loss) / sum(w)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def validate_item_losses(losses: Tensor, mask: Tensor | None) -> None:
    """Raise a ``ValueError`` naming the fix when ``losses``/``mask`` cannot be counted item by item.

    Checks that need no host synchronisation run here; the 0/1 check of a non-bool mask is queued on
    the device (``torch._assert_async``) so it costs no sync on an accelerator.

    Examples:
        >>> validate_item_losses(torch.tensor(0.5), None)
        Traceback (most recent call last):
        ...
        ValueError: sample_loss expects one loss per item ...
        >>> validate_item_losses(torch.ones(2), torch.ones(2, dtype=torch.bool, device="meta"))
        Traceback (most recent call last):
        ...
        ValueError: mask is on meta but losses are on cpu; build the mask on the losses' device, ...
    """
    if not isinstance(losses, Tensor):
        raise TypeError(f"sample_loss expects a tensor of per-item losses, got {type(losses).__name__}.")
    if losses.ndim == 0:
        raise ValueError(
            "sample_loss expects one loss per item (a tensor with at least one dimension), got a 0-dim "
            "tensor, which is already a mean. Compute the loss with reduction='none', e.g. "
            "F.cross_entropy(logits, target, reduction='none')."
        )
    if not losses.is_floating_point():
        raise TypeError(f"sample_loss expects floating-point losses, got dtype {losses.dtype}.")
    if mask is None:
        return
    require_shape_of(losses, "mask", mask, "one mask entry per item loss (same shape), e.g. mask=target != -100")
    if mask.device != losses.device:
        raise ValueError(
            f"mask is on {mask.device} but losses are on {losses.device}; build the mask on the losses' device, "
            "e.g. mask=target != -100 from the target in the batch, or pass mask.to(losses.device)."
        )
    if mask.dtype == torch.bool:
        return
    if mask.is_complex():
        raise TypeError(f"mask must be bool or hold only 0 and 1, got dtype {mask.dtype}.")
    torch._assert_async(
        ((mask == 0) | (mask == 1)).all(),
        "mask must be bool or hold only 0 and 1; pass per-item weights as sample_loss(losses, mask, weight=w)",
    )


def require_shape_of(losses: Tensor, name: str, value: object, hint: str) -> None:
    """Raise unless ``value`` (the argument ``name``) is a tensor of the shape of ``losses``; ``hint`` says what
    to pass.

    Examples:
        >>> require_shape_of(torch.ones(2, 3), "mask", torch.ones(2), "one entry per item loss")
        Traceback (most recent call last):
        ...
        ValueError: mask has shape (2,) but losses have shape (2, 3); pass one entry per item loss.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor of the same shape as losses, got {type(value).__name__}.")
    if value.shape != losses.shape:
        raise ValueError(
            f"{name} has shape {tuple(value.shape)} but losses have shape {tuple(losses.shape)}; pass {hint}."
        )


def validate_weight(losses: Tensor, weight: Tensor) -> None:
    """Raise naming the fix when ``weight`` cannot weigh ``losses`` item by item.

    Negative, ``nan`` and infinite weights are refused by a check queued on the device (``torch._assert_async``:
    no host synchronisation on an accelerator; on the CPU it raises at once).

    Examples:
        >>> validate_weight(torch.ones(3), torch.tensor([1.0, -0.5, 2.0]))
        Traceback (most recent call last):
        ...
        RuntimeError: weight must be finite and non-negative ...
    """
    require_shape_of(losses, "weight", weight, "one non-negative weight per item loss (same shape)")
    if not weight.is_floating_point():
        raise TypeError(f"weight must hold floating-point numbers, got dtype {weight.dtype}; e.g. weight.float().")
    torch._assert_async(
        (torch.isfinite(weight) & (weight >= 0)).all(),
        "weight must be finite and non-negative (no nan, inf or negative entries); to leave an item out, give it "
        "weight 0 or mask it",
    )


def count_dtype(device: torch.device) -> torch.dtype:
    """The dtype of item counts on ``device``: float64 (exact to 2**53 items), float32 on MPS, which lacks float64.

    Examples:
        >>> count_dtype(torch.device("cpu")), count_dtype(torch.device("mps"))
        (torch.float64, torch.float32)
    """
    return torch.float32 if device.type == "mps" else torch.float64


def masked_sum_and_count(
    losses: Tensor, mask: Tensor | None = None, weight: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Return ``(sum of the counted item losses, number of counted items)`` as 0-dim tensors.

    With ``weight`` (non-negative, the shape of ``losses``) it returns ``(sum of w * loss, sum of w)`` over the
    counted items: a masked item weighs 0.

    The sum keeps the autograd graph and is accumulated in at least float32, so half-precision
    per-item losses do not overflow when summed. Items outside the mask contribute exactly zero to the
    value, even when their loss is ``nan`` or ``inf``; but a non-finite masked loss can still give ``nan``
    gradients upstream (``0 * inf``), so keep masked inputs finite (e.g. pad with a valid token). The count
    is a float64 tensor on the losses' device (float32 on MPS).

    Examples:
        >>> losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, float("nan")]])
        >>> mask = torch.tensor([[True, True, False], [True, False, False]])
        >>> masked_sum_and_count(losses, mask)
        (tensor(7.), tensor(3., dtype=torch.float64))
        >>> masked_sum_and_count(torch.tensor([0.5, 1.5]))
        (tensor(2.), tensor(2., dtype=torch.float64))
        >>> masked_sum_and_count(losses, mask, weight=torch.full((2, 3), 0.5))
        (tensor(3.5000), tensor(1.5000, dtype=torch.float64))
    """
    validate_item_losses(losses, mask)
    sum_dtype = torch.promote_types(losses.dtype, torch.float32)
    dtype = count_dtype(losses.device)
    if weight is not None:
        validate_weight(losses, weight)
        counted = torch.ones_like(losses, dtype=torch.bool) if mask is None else mask.bool()
        zero = torch.zeros((), dtype=sum_dtype, device=losses.device)
        weighted = torch.where(counted, losses.to(sum_dtype) * weight.to(sum_dtype), zero)
        return weighted.sum(), torch.where(counted, weight.to(dtype), zero.to(dtype)).sum()
    if mask is None:
        count = torch.full((), losses.numel(), dtype=dtype, device=losses.device)  # no host-to-device copy
        return losses.sum(dtype=sum_dtype), count
    counted = mask if mask.dtype == torch.bool else mask != 0
    loss_sum = torch.where(counted, losses, torch.zeros((), dtype=losses.dtype, device=losses.device))
    return loss_sum.sum(dtype=sum_dtype), counted.sum(dtype=dtype)


def item_mean(losses: Tensor, mask: Tensor | None = None, weight: Tensor | None = None) -> Tensor:
    """The mean over one batch's counted items, for every path outside the rescaler's window (validation, test,
    Lightning's Tuner).

    With ``weight`` it is the weighted mean ``sum(w * loss) / sum(w)``. A batch with no counted item (or
    weights summing to 0) has no mean: it gives ``nan``, with a zero gradient, so a backward of it (the
    Tuner's) changes nothing.

    Examples:
        >>> losses = torch.tensor([1.0, 2.0, 6.0], requires_grad=True)
        >>> item_mean(losses, torch.tensor([True, False, True]))
        tensor(3.5000, grad_fn=<WhereBackward0>)
        >>> empty = item_mean(losses, torch.zeros(3, dtype=torch.bool))
        >>> empty.backward()
        >>> empty, losses.grad
        (tensor(nan, grad_fn=<WhereBackward0>), tensor([0., 0., 0.]))
    """
    loss_sum, items = masked_sum_and_count(losses, mask, weight)
    mean = loss_sum / items.clamp_min(1).to(loss_sum.dtype)
    return torch.where(items > 0, mean, torch.full_like(mean, float("nan")))
