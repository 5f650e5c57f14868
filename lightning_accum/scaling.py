"""The weighting math of both modes: the loss each micro-batch returns, and the window's gradient factor.

Lightning divides every micro-batch loss by the accumulation K and DDP averages gradients over R ranks,
so a window's gradient is ``sum over micro-batches b of grad(L_b) / (K * R)``. With ``S_b`` a micro-batch's
sum of counted item losses and ``N`` the window's global item count, the goal is ``grad(sum S_b) / N``:

- deferred mode returns ``L_b = S_b / u`` (``u`` a constant of the run, near the items of a micro-batch, that
  keeps the backward near a mean loss) and multiplies the window's gradient by ``K * R * u / N``;
- look-ahead mode knows ``N`` before the window and returns ``L_b = S_b * K * R / N``; nothing is rescaled,
  unless micro-batches that were counted ahead never reached a backward (their items are then missing from
  the gradient, and ``N_counted / N_backpropagated`` corrects it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor


def _require_positive(accumulate_grad_batches: int, world_size: int) -> None:
    if accumulate_grad_batches < 1 or world_size < 1:
        raise ValueError(
            f"accumulate_grad_batches and world_size must be >= 1, got {accumulate_grad_batches} and {world_size}."
        )


def deferred_loss(loss_sum: Tensor, items_per_micro_batch: Tensor) -> Tensor:
    """Deferred mode: the micro-batch loss ``S_b / u`` (exact once the window is rescaled).

    Examples:
        >>> deferred_loss(torch.tensor(12.0), torch.tensor(8.0, dtype=torch.float64))
        tensor(1.5000)
    """
    return loss_sum / items_per_micro_batch.to(loss_sum.dtype)


def window_rescale_factor(
    accumulate_grad_batches: int, world_size: int, items_per_micro_batch: Tensor, global_items: Tensor
) -> Tensor:
    """Deferred mode: ``K * R * u / N``, the factor that turns the accumulated gradient into the item mean.

    Examples:
        >>> # K=4 micro-batches of about u=8 items on R=2 ranks, but the window held only 40 items
        >>> window_rescale_factor(4, 2, torch.tensor(8.0), torch.tensor(40.0))
        tensor(1.6000)
    """
    _require_positive(accumulate_grad_batches, world_size)
    return (accumulate_grad_batches * world_size) * items_per_micro_batch / global_items


def lookahead_loss_factor(accumulate_grad_batches: int, world_size: int, global_items: Tensor) -> Tensor:
    """Look-ahead mode: ``K * R / N``; a micro-batch's loss sum times this, averaged by Lightning (1/K) and DDP
    (1/R), contributes exactly its share of the window's item mean. An empty window (``N = 0``) gives ``K * R``
    (its loss sums are all zero).

    Examples:
        >>> lookahead_loss_factor(4, 2, torch.tensor(40.0))
        tensor(0.2000)
    """
    _require_positive(accumulate_grad_batches, world_size)
    return (accumulate_grad_batches * world_size) / global_items.clamp_min(1)


def scale_gradients_(grads: Iterable[Tensor], factor: Tensor) -> None:
    """Multiply every gradient in place by ``factor`` with one fused foreach op per (device, dtype).

    No gradient is copied. ``factor`` is a 0-dim tensor, so no host synchronisation happens.

    Examples:
        >>> g1, g2 = torch.ones(3), torch.full((2, 2), 2.0)
        >>> scale_gradients_([g1, g2], torch.tensor(0.5))
        >>> g1, g2
        (tensor([0.5000, 0.5000, 0.5000]), tensor([[1., 1.],
                [1., 1.]]))
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for grad in grads:
        groups[(grad.device, grad.dtype)].append(grad)
    for (device, dtype), group in groups.items():
        torch._foreach_mul_(group, factor.to(device=device, dtype=torch.promote_types(dtype, torch.float32)))
