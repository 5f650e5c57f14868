"""The runs of a length-sorted window: which runs fit the limits, and what one costs.

A run ``[i, j)`` of the ascending lengths ``L`` is one micro-batch padded to ``L[j - 1]``: ``c = L[j - 1] * (j - i)``
padded tokens. The grouping minimises, in this order, the padded tokens, the sum of squared padded sizes (the
most even groups) and minus the sum of the run starts (the latest boundaries). ``Runs.weight`` folds the three
into one integer, exactly: each key's weight exceeds the whole range of the keys below it (the least such
weights for the Python passes; with ``wide_keys``, 2**128 and 2**64, so that each key is one 64-bit digit for
the compiled ones). Every key obeys the quadrangle inequality ``w(a, c) + w(b, d) <= w(a, d) + w(b, c)`` for
``a <= b <= c <= d`` (the padded tokens and their squares because ``L`` ascends, the start term with equality), so
the weight does too: the property the price search and its passes rest on.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import numpy as np

# The base in which ``wide_keys`` fold the keys: each key one 64-bit digit of the weight.
WIDE_DIGIT = 2**64


class Runs:
    """The runs of ascending ``lengths`` that hold at most ``max_samples`` samples and ``max_tokens`` padded tokens.

    Args:
        lengths: the window's lengths, ascending, positive.
        max_samples: the most samples in one run, ``None`` for no limit.
        max_tokens: the most padded tokens in one run, ``None`` for no limit.
        wide_keys: fold the keys in base 2**64 (for ``compiled_passes``) instead of the least weights, when every
            key's range fits one such digit (``self.wide_keys`` says whether it did).

    Examples:
        >>> runs = Runs([1, 2, 5, 5], max_samples=None, max_tokens=10)
        >>> runs.first_start  # the earliest start of a run that fits, for every end 0..4
        [0, 0, 0, 1, 2]
        >>> runs.last_end  # the latest end of a run that fits, for every start 0..4
        [2, 3, 4, 4, 4]
        >>> runs.padded(1, 4)  # samples 1..3 padded to 5
        15
        >>> runs.weight(2, 4) > runs.weight(3, 4) + runs.weight(2, 3)  # two runs of 5 beat one of 10
        True
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        max_samples: int | None,
        max_tokens: int | None,
        wide_keys: bool = False,
    ) -> None:
        self.array = np.asarray(lengths, dtype=np.int64).reshape(-1)
        n = self.size = len(self.array)
        fits = np.full(n, n if max_samples is None else min(n, max_samples), dtype=np.int64)
        if max_tokens is not None:
            fits = np.minimum(fits, max_tokens // np.maximum(self.array, 1))
        ends = np.arange(n + 1, dtype=np.int64)
        self.first_start_array = np.concatenate([[0], np.maximum(0, ends[1:] - fits)])
        # The latest end of a run that fits, for every start: first_start ascends with the end.
        self.last_end_array = np.searchsorted(self.first_start_array, ends, side="right") - 1
        self.longest = int(self.array[-1]) if n else 0
        self.widest_padded = int((self.array * (ends[1:] - self.first_start_array[1:])).max()) if n else 0
        # Wide keys need each key's whole range inside one 64-bit digit: squares up to n * longest * widest.
        self.wide_keys = wide_keys and max(n * self.longest * self.widest_padded, n * n) < 2**62
        if self.wide_keys:
            self.square_weight, self.padding_weight = WIDE_DIGIT, WIDE_DIGIT**2
        else:  # the start term ranges over less than n * n + 1, the weighted squares over less than the padding's
            self.square_weight = n * n + 1
            self.padding_weight = self.square_weight * ((n * self.longest) ** 2 + 1)

    @cached_property
    def lengths(self) -> list[int]:
        """The lengths as a list (for the Python passes)."""
        return self.array.tolist()

    @cached_property
    def first_start(self) -> list[int]:
        """The earliest start of a run that fits, for every end ``0..n``."""
        return self.first_start_array.tolist()

    @cached_property
    def last_end(self) -> list[int]:
        """The latest end of a run that fits, for every start ``0..n``."""
        return self.last_end_array.tolist()

    def padded(self, start: int, end: int) -> int:
        """Padded tokens of the run ``[start, end)``: its longest length times its samples."""
        return self.lengths[end - 1] * (end - start)

    def weight(self, start: int, end: int) -> int:
        """The run's padded tokens, squared padded tokens and start folded into one integer (lower is better)."""
        padded = self.lengths[end - 1] * (end - start)
        return (self.padding_weight + self.square_weight * padded) * padded - start

    def bound(self) -> int:
        """More than the weight of any grouping of the window: a price per run that makes fewer runs always win.

        A grouping's padded tokens are at most ``n * longest`` and its lower keys weigh less than one padded token.
        """
        return (self.size * self.longest + 1) * self.padding_weight

    def fits_nowhere(self) -> bool:
        """Whether some sample fits no run (it alone breaks a limit)."""
        return bool((self.first_start_array[1:] == np.arange(1, self.size + 1)).any())
