"""The epoch's order at any dataset size: an ``int32`` tensor sliced per window, drawn ahead when it is large.

The order of epoch ``e`` is ``torch.randperm(n, generator=Generator().manual_seed(seed + e))``, as it always
was. Below ``DRAW_AHEAD_FROM`` samples it is drawn when the epoch starts (milliseconds). From there on a
background thread draws it (about a second per 10M samples) and the next epoch's as soon as this one's is
ready, so later epochs start at once; until the thread is done, the first windows come from the same
Fisher-Yates shuffle that ``randperm`` runs, advanced only as far as they reach: ``randperm`` below
``2**32 / 20`` samples swaps position ``i`` with ``i + r_i % (n - i)`` for the 32-bit outputs ``r_i`` of the
generator's Mersenne Twister, which NumPy's ``MT19937`` reproduces from the same seed. When the tensor arrives
it must agree with every index served before it, or iteration stops with an error rather than change the
trajectory.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Callable

import numpy as np
import torch

DRAW_AHEAD_FROM = 4_000_000
"""Dataset size from which permutations are drawn on a background thread (and the next epoch's ahead)."""

_LAZY_BELOW = 2**32 // 20  # randperm's one-32-bit-draw-per-swap algorithm holds below this size
_LAZY_REACH = 2_000_000  # the most swaps the lazy shuffle runs ahead of itself before waiting for the thread
_CHUNK = 1 << 16


def draw_permutation(n: int, seed: int) -> torch.Tensor:
    """``randperm(n)`` seeded by ``seed``, as ``int32`` when the indices fit (the same order as ``int64``).

    Examples:
        >>> generator = torch.Generator().manual_seed(3)
        >>> draw_permutation(6, seed=3).tolist() == torch.randperm(6, generator=generator).tolist()
        True
    """
    dtype = torch.int32 if n <= 2**31 else torch.int64
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class BackgroundDraw:
    """``draw_permutation(n, seed)`` on a background (non-daemon) thread.

    Examples:
        >>> draw = BackgroundDraw(5, seed=1)
        >>> draw.result().tolist() == draw_permutation(5, seed=1).tolist()
        True
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._result: torch.Tensor | None = None
        self._thread = threading.Thread(target=self._run, name=f"randperm-{seed}")
        self._thread.start()

    def _run(self) -> None:
        self._result = draw_permutation(self.n, self.seed)

    def done(self) -> bool:
        """Whether the permutation is ready."""
        return not self._thread.is_alive()

    def result(self) -> torch.Tensor:
        """The permutation, waiting for the thread if it is still drawing."""
        self._thread.join()
        if self._result is None:
            raise RuntimeError(f"drawing the permutation of {self.n} samples (seed {self.seed}) failed; see above.")
        return self._result


class LazyShuffle:
    """The first indices of ``randperm(n)`` seeded by ``seed``, by running its swaps only as far as asked.

    Memory holds the indices served and the positions the swaps displaced, not ``n`` entries.

    Examples:
        >>> lazy = LazyShuffle(1000, seed=5)
        >>> lazy.take(0, 4) + lazy.take(4, 6) == draw_permutation(1000, seed=5)[:6].tolist()
        True
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.served = array("q")
        self._displaced: dict[int, int] = {}
        self._bits = np.random.RandomState(seed & 0xFFFFFFFF)._bit_generator  # torch's mt19937, seeded alike
        self._draws: list[int] = []

    def take(self, start: int, stop: int) -> list[int]:
        """Indices at positions ``start..stop-1``, running the swaps up to ``stop``."""
        n, displaced, served = self.n, self._displaced, self.served
        for i in range(len(served), stop):
            if not self._draws:
                self._draws = self._bits.random_raw(min(_CHUNK, n)).tolist()[::-1]
            j = i + self._draws.pop() % (n - i) if i < n - 1 else i
            here = displaced.pop(i, i)
            if j != i:
                here, displaced[j] = displaced.get(j, j), here
            served.append(here)
        return served[start:stop].tolist()


class EpochOrder:
    """One epoch's order of ``n`` indices, read a window at a time.

    Args:
        n: number of indices.
        seed: the permutation's seed, ``None`` for the identity order.
        draw: the background draw of this permutation, for large ``n`` (``None`` draws it at once).
        on_ready: called once when a background permutation is ready (to draw the next epoch's ahead).

    Examples:
        >>> EpochOrder(5, seed=None).take(1, 3)
        [1, 2]
        >>> EpochOrder(5, seed=1).take(0, 5) == draw_permutation(5, seed=1).tolist()
        True
    """

    def __init__(
        self,
        n: int,
        seed: int | None,
        draw: BackgroundDraw | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.n, self._draw, self._on_ready = n, draw, on_ready
        self._tensor = None if seed is None or draw is not None else draw_permutation(n, seed)
        lazy = seed is not None and draw is not None and n < _LAZY_BELOW
        self._lazy = LazyShuffle(n, seed) if lazy else None
        self._identity = seed is None

    def take(self, start: int, stop: int) -> list[int]:
        """The indices at positions ``start..stop-1`` of the epoch's order."""
        if self._identity:
            return list(range(start, min(stop, self.n)))
        if self._tensor is None and self._draw is not None:
            lazy = self._lazy
            if not self._draw.done() and lazy is not None and stop - len(lazy.served) <= _LAZY_REACH:
                return lazy.take(start, stop)
            self._adopt(self._draw.result())
        return self._tensor[start:stop].tolist()

    def _adopt(self, tensor: torch.Tensor) -> None:
        """Switch to the drawn tensor, after checking it against what the lazy shuffle served."""
        served = self._lazy.served if self._lazy is not None else array("q")
        if served and tensor[: len(served)].tolist() != served.tolist():
            raise RuntimeError(
                "torch.randperm no longer runs the Fisher-Yates swaps this sampler reproduces for the first windows "
                "of an epoch, so the order would change mid-epoch. Report this with your torch version; set "
                "lightning_accum.data.permutation.DRAW_AHEAD_FROM above the dataset size to avoid it meanwhile."
            )
        self._tensor, self._draw, self._lazy = tensor, None, None
        if self._on_ready is not None:
            self._on_ready()
