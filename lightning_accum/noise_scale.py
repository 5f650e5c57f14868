"""The gradient noise scale's math: small-batch norms with exact item counts, the unbiased estimates, smoothing.

McCandlish et al. 2018 (Appendix A): a gradient averaged over ``B`` items has ``E|G_B|² = |G|² + tr(Σ) / B``.
Given small-batch gradients ``g_i`` over ``b_i`` items (``m`` of them) and the step's gradient ``G_N`` over
``N`` items, with ``s = mean |g_i|²`` and ``h = mean 1 / b_i``, both estimates below are unbiased (linear in
the measured squares), also when the ``b_i`` differ:

    tr(Σ) ≈ (s - |G_N|²) / (h - 1/N)          |G|² ≈ (h |G_N|² - s / N) / (h - 1/N)

With equal ``b_i = b`` they are the paper's ``(N|G_N|² - b s) / (N - b)`` and ``(s - |G_N|²) / (1/b - 1/N)``.
Each is smoothed separately (a bias-corrected exponential moving average) before their ratio
``B_simple = tr(Σ) / |G|²``.

``|G_N|²`` is read once per step over all ranks, not once per rank: after the data-parallel reduction every rank
holds the same ``G_N``, so each takes the squared norm of its own ``1/R`` of the elements (``gradient_share``) and
the step's all-reduce adds the shares. Nothing here imports Lightning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_accum.totals import Packed, WindowTotals


@dataclasses.dataclass(frozen=True)
class SmallBatchTotals(Packed):
    """The small-batch gradients of a step, summed over ranks in the step's all-reduce (0 where none was taken)."""

    squares: Tensor  # sum of |g_i|², each g_i an item mean
    inverse_items: Tensor  # sum of 1 / b_i
    batches: Tensor  # m


def squared_norm(grads: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """``sum |g|²`` over ``grads`` in ``dtype`` (one fused norm; no host synchronisation).

    Examples:
        >>> squared_norm([torch.tensor([3.0]), torch.tensor([4.0, 0.0])], torch.float64)
        tensor(25., dtype=torch.float64)
    """
    if not grads:
        return torch.zeros((), dtype=dtype)
    return torch.stack(torch._foreach_norm(list(grads), 2, dtype=dtype)).square().sum()


def gradient_share(params: Sequence[torch.nn.Parameter], rank: int, ranks: int) -> list[Tensor]:
    """Rank ``rank``'s ``1/ranks`` of the parameters' gradients: views of the elements ``[rank·P/ranks,
    (rank+1)·P/ranks)`` of their concatenation (``P`` elements; a gradient that is ``None`` counts as zeros).

    The ranks' shares are disjoint and cover every element, so their squared norms add up to the whole one.

    Examples:
        >>> a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
        >>> a.grad, b.grad = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[4.0, 5.0], [6.0, 7.0]])
        >>> [[t.tolist() for t in gradient_share([a, b], rank, 3)] for rank in range(3)]
        [[[1.0, 2.0]], [[3.0], [4.0]], [[5.0, 6.0, 7.0]]]
    """
    total = sum(p.numel() for p in params)
    start, stop = total * rank // ranks, total * (rank + 1) // ranks
    share, offset = [], 0
    for p in params:
        low, high = max(start - offset, 0), min(stop - offset, p.numel())
        if low < high and p.grad is not None:
            share.append(p.grad.reshape(-1)[low:high])
        offset += p.numel()
    return share


def small_batch(squared: Tensor, window: WindowTotals, loss_factor: Tensor) -> SmallBatchTotals:
    """One small batch: ``squared`` is ``|grad|²`` of the gradients that ``window``'s backwards accumulated.

    Each backward added ``loss_factor * g * grad(S_b)`` (``g = grad_sum / outputs``, what reached the loss), so
    the item-mean gradient is the accumulated one divided by ``loss_factor * g * items``. No items: zeros.

    Examples:
        >>> window = WindowTotals(*torch.tensor([0.0, 4.0, 2.0, 1.0, 0.5, 0.0, 0.0, 0.0], dtype=torch.float64).unbind())
        >>> small = small_batch(torch.tensor(1.0, dtype=torch.float64), window, torch.tensor(0.5, dtype=torch.float64))
        >>> small.squares, small.inverse_items, small.batches  # g = 0.5: the accumulated gradient is 0.25 · 4 · mean
        (tensor(1., dtype=torch.float64), tensor(0.2500, dtype=torch.float64), tensor(1., dtype=torch.float64))
    """
    dtype = window.items.dtype
    valid = (window.items > 0) & (window.outputs > 0) & (window.grad_sum != 0)
    unit = (window.grad_sum / window.outputs.clamp_min(1)) * loss_factor.to(dtype) * window.items
    unit = torch.where(valid, unit, torch.ones_like(unit))
    zero = torch.zeros_like(unit)
    return SmallBatchTotals(
        torch.where(valid, squared.to(dtype) / unit.square(), zero),
        torch.where(valid, 1.0 / window.items.clamp_min(1), zero),
        valid.to(dtype),
    )


def noise_estimates(small: SmallBatchTotals, big_squared: Tensor, big_items: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(|G|², tr(Σ), valid)`` of one step (module docstring); not ``valid`` without a smaller small batch.

    Examples:
        >>> small = SmallBatchTotals(torch.tensor(2 * 5.0), torch.tensor(2 / 4.0), torch.tensor(2.0))
        >>> noise_estimates(small, torch.tensor(3.0), torch.tensor(8.0))  # |G|² = 1, tr(Σ) = 16
        (tensor(1.), tensor(16.), tensor(True))
    """
    batches = small.batches.clamp_min(1)
    s, h = small.squares / batches, small.inverse_items / batches
    inverse_big = 1.0 / big_items.clamp_min(1)
    gap = h - inverse_big
    valid = (small.batches > 0) & (big_items > 0) & (gap > 0)
    gap = torch.where(valid, gap, torch.ones_like(gap))
    big_squared = big_squared.to(gap)
    return (h * big_squared - s * inverse_big) / gap, (s - big_squared) / gap, valid


class SmoothedNoiseScale:
    """Bias-corrected exponential moving averages of ``|G|²`` and ``tr(Σ)`` (``smoothing``: the decay, in [0, 1)).

    Steps without a valid estimate leave them unchanged; before the first they are ``nan``.

    Examples:
        >>> smoothed = SmoothedNoiseScale(0.5)
        >>> smoothed.update(torch.tensor(1.0), torch.tensor(4.0), torch.tensor(True))
        >>> smoothed.update(torch.tensor(3.0), torch.tensor(0.0), torch.tensor(False))
        >>> smoothed.update(torch.tensor(3.0), torch.tensor(8.0), torch.tensor(True))
        >>> smoothed.grad_squared, smoothed.trace, smoothed.noise_scale  # (0.5·1 + 1·3) / 1.5 …
        (tensor(2.3333), tensor(6.6667), tensor(2.8571))
    """

    def __init__(self, smoothing: float) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"`smoothing` must be in [0, 1), got {smoothing!r}.")
        self.smoothing = smoothing
        self.reset()

    def reset(self) -> None:
        """Forget every estimate."""
        self.sums = torch.zeros(2)  # the averages of |G|² and tr(Σ), before the bias correction
        self.weight = torch.zeros(())  # 1 - smoothing ** (valid steps)

    def update(self, grad_squared: Tensor, trace: Tensor, valid: Tensor) -> None:
        """Add one step's estimates where ``valid`` (0-dim bool); on their device, without a host read."""
        beta = self.smoothing
        x = torch.stack([grad_squared, trace])
        self.sums = self.sums.to(x)
        self.weight = self.weight.to(x)
        self.sums = torch.where(valid, beta * self.sums + (1 - beta) * x, self.sums)
        self.weight = torch.where(valid, beta * self.weight + (1 - beta), self.weight)

    @property
    def grad_squared(self) -> Tensor:
        """Smoothed ``|G|²``."""
        return self.sums[0] / self.weight

    @property
    def trace(self) -> Tensor:
        """Smoothed ``tr(Σ)``."""
        return self.sums[1] / self.weight

    @property
    def noise_scale(self) -> Tensor:
        """``B_simple = tr(Σ) / |G|²`` of the smoothed parts."""
        return self.sums[1] / self.sums[0]
