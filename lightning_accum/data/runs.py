"""The runs of a length-sorted window: which runs fit the limits, and what one costs.

A run ``[i, j)`` of the ascending lengths ``L`` is one micro-batch padded to ``L[j - 1]``: ``c = L[j - 1] * (j - i)``
padded tokens. The grouping minimises, in this order, the padded tokens, the sum of squared padded sizes (the
most even groups) and minus the sum of the run starts (the latest boundaries). ``Runs.weight`` folds the three
into one integer, exactly: each key's weight exceeds the whole range of the keys below it. Every key obeys the
quadrangle inequality ``w(a, c) + w(b, d) <= w(a, d) + w(b, c)`` for ``a <= b <= c <= d`` (the padded tokens and
their squares because ``L`` ascends, the start term with equality), so the weight does too: the property the
price search and its passes rest on.
"""

from __future__ import annotations

from collections.abc import Sequence


class Runs:
    """The runs of ascending ``lengths`` that hold at most ``max_samples`` samples and ``max_tokens`` padded tokens.

    Args:
        lengths: the window's lengths, ascending.
        max_samples: the most samples in one run, ``None`` for no limit.
        max_tokens: the most padded tokens in one run, ``None`` for no limit.

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

    def __init__(self, lengths: Sequence[int], max_samples: int | None, max_tokens: int | None) -> None:
        self.lengths = list(lengths)
        n = self.size = len(self.lengths)
        widest = n if max_samples is None else min(n, max_samples)
        self.first_start = [0] * (n + 1)
        for end in range(1, n + 1):
            fits = widest if max_tokens is None else min(widest, max_tokens // self.lengths[end - 1])
            self.first_start[end] = max(0, end - fits)
        self.last_end = [0] * (n + 1)  # the latest end of a run that fits, for every start
        end = 0
        for start in range(n + 1):
            while end < n and self.first_start[end + 1] <= start:
                end += 1
            self.last_end[start] = end
        longest = self.lengths[-1] if n else 0
        # The start term ranges over less than n * n + 1, the weighted squares over less than the padding's weight.
        self.square_weight = n * n + 1
        self.padding_weight = self.square_weight * ((n * longest) ** 2 + 1)

    def padded(self, start: int, end: int) -> int:
        """Padded tokens of the run ``[start, end)``: its longest length times its samples."""
        return self.lengths[end - 1] * (end - start)

    def weight(self, start: int, end: int) -> int:
        """The run's padded tokens, squared padded tokens and start folded into one integer (lower is better)."""
        padded = self.lengths[end - 1] * (end - start)
        return (self.padding_weight + self.square_weight * padded) * padded - start

    def bound(self) -> int:
        """More than the weight of any grouping of the window: a price per run that makes fewer runs always win."""
        padded = self.size * (self.lengths[-1] if self.size else 0)
        return (self.padding_weight + self.square_weight * padded) * padded + self.size * self.size + 1
