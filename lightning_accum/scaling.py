"""Scale factors of the deferred rescale and the in-place gradient multiply.

A micro-batch returns ``sum of its item losses / u``, where ``u`` is a constant number of items per
micro-batch fixed once for the run (it only keeps the backward near the size of a mean loss).
Lightning divides that by the accumulation K and DDP averages over the R ranks, so the accumulated
gradient is ``grad(S) / (K * R * u)`` with ``S`` the window's global loss sum. Multiplying it by
``K * R * u / N`` (``N`` the window's global item count) gives exactly ``grad(S) / N``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor


def window_rescale_factor(
    accumulate_grad_batches: int, world_size: int, items_per_micro_batch: Tensor, global_items: Tensor
) -> Tensor:
    """Return ``K * R * u / N``, the factor that turns the accumulated gradient into the item mean.

    Example::

        >>> # K=4 micro-batches of about u=8 items on R=2 ranks, but the window held only 40 items
        >>> window_rescale_factor(4, 2, torch.tensor(8.0), torch.tensor(40.0))
        tensor(1.6000)
    """
    if accumulate_grad_batches < 1 or world_size < 1:
        raise ValueError(
            f"accumulate_grad_batches and world_size must be >= 1, got {accumulate_grad_batches} and {world_size}."
        )
    return (accumulate_grad_batches * world_size) * items_per_micro_batch / global_items


def scale_gradients_(grads: Iterable[Tensor], factor: Tensor) -> None:
    """Multiply every gradient in place by ``factor`` with one fused foreach op per (device, dtype).

    No gradient is copied. ``factor`` is a 0-dim tensor, so no host synchronisation happens.

    Example::

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
