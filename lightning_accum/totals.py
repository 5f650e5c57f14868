"""Named totals that travel in one tensor, and the verdict a step reads from them.

A window's totals are summed on the device at every backward and over the ranks in the step's one all-reduce,
so they live in one flat tensor. ``Packed`` gives that tensor named fields: each quantity is declared once, as a
dataclass field, and read by name everywhere (engines, resume, logging). Adding a quantity is one line here.
"""

from __future__ import annotations

import dataclasses
from enum import IntFlag
from functools import cache
from typing import TypeVar

import torch
from torch import Tensor

P = TypeVar("P", bound="Packed")


@cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(field.name for field in dataclasses.fields(cls))


class Packed:
    """Base of a dataclass whose fields are 0-dim tensors, packed into one vector in declaration order.

    Examples:
        >>> totals = WindowTotals.zeros(torch.device("cpu"), torch.float64)
        >>> WindowTotals.unpack(totals.pack() + 2.0).items
        tensor(2., dtype=torch.float64)
    """

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The field names, in the order they are packed."""
        return _field_names(cls)

    @classmethod
    def size(cls) -> int:
        """How many values one packed vector holds."""
        return len(cls.names())

    def pack(self) -> Tensor:
        """The fields as one 1-D tensor (one ``torch.stack``, no host synchronisation)."""
        return torch.stack([getattr(self, name) for name in self.names()])

    @classmethod
    def unpack(cls: type[P], vector: Tensor) -> P:
        """The fields of a vector made by ``pack`` (or a sum of such vectors)."""
        return cls(*vector.unbind())  # type: ignore[call-arg]

    @classmethod
    def zeros(cls: type[P], device: torch.device, dtype: torch.dtype) -> P:
        """Every field 0."""
        return cls.unpack(torch.zeros(cls.size(), device=device, dtype=dtype))


@dataclasses.dataclass(frozen=True)
class WindowTotals(Packed):
    """What the backward passes of a window carried (on one rank, or summed over ranks after the step's reduce).

    ``g`` is the gradient that reaches a ``sample_loss`` output: the same for every output of a window when they
    are summed with one weight, which ``contract.weights_differ`` checks as ``outputs * grad_squares ==
    grad_sum ** 2``.
    """

    loss_sum: Tensor  # sum of the counted item losses
    items: Tensor  # counted items
    outputs: Tensor  # sample_loss outputs that a backward carried
    grad_sum: Tensor  # sum of g over those outputs
    grad_squares: Tensor  # sum of g ** 2
    expected_items: Tensor  # look-ahead: what count_items counted in the same micro-batches (0 in deferred mode)
    weighted_outputs: Tensor  # sample_loss outputs with per-item weights (their counts are weight sums)
    term_outputs: Tensor  # batch_loss outputs that a backward carried


@dataclasses.dataclass(frozen=True)
class EpochAgreement(Packed):
    """Whether the ranks agree on their epoch's length, summed over ranks in the step's all-reduce.

    Ranks whose epochs differ would wait on each other's collectives at the epoch's end; with ``n`` a rank's
    batch count, equal counts on every rank hold exactly when ``R * sum(n ** 2) == sum(n) ** 2``.
    """

    ranks_ending: Tensor  # ranks whose epoch ends at this step
    ranks_known: Tensor  # ranks that know their epoch's batch count
    batches: Tensor  # sum of the known batch counts
    batches_squared: Tensor  # sum of their squares

    @classmethod
    def of_rank(
        cls, ends_epoch: bool, epoch_batches: float, device: torch.device, dtype: torch.dtype
    ) -> EpochAgreement:
        """This rank's entry: ``epoch_batches`` is ``inf`` when the loader has no length.

        Filled from host scalars without a host-to-device copy (no synchronisation on an accelerator).

        Examples:
            >>> EpochAgreement.of_rank(True, 7.0, torch.device("cpu"), torch.float64).batches_squared
            tensor(49., dtype=torch.float64)
        """
        known = epoch_batches != float("inf")
        n = epoch_batches if known else 0.0
        vector = torch.empty(cls.size(), dtype=dtype, device=device)
        for i, value in enumerate((float(ends_epoch), float(known), n, n * n)):
            vector[i] = value
        return cls.unpack(vector)

    def disagree(self, world_size: int) -> Tensor:
        """True (a 0-dim bool tensor) when some ranks end their epoch here and others do not, or lengths differ."""
        uneven = (self.ranks_known == world_size) & (world_size * self.batches_squared != self.batches * self.batches)
        return ((self.ranks_ending != 0) & (self.ranks_ending != world_size)) | uneven


class Verdict(IntFlag):
    """What a finished window decided, computed on the device and read in one host read per optimizer step."""

    EMPTY = 1  # no item counted on any rank: no update
    RANKS_DISAGREE = 2  # the ranks' epochs differ
    WEIGHTS_DIFFER = 4  # sample_loss outputs were backpropagated with different weights
    COUNT_MISMATCH = 8  # look-ahead: count_items differs from the masks
    NOT_ALL_CARRIED = 16  # look-ahead: counted micro-batches that no backward carried
    TERMS_NOT_ALL_CARRIED = 32  # look-ahead: as NOT_ALL_CARRIED, in a window with batch_loss terms

    @staticmethod
    def of(**flags: Tensor) -> Tensor:
        """The verdict of 0-dim bool tensors named after the flags, as a 0-dim int tensor (no host read).

        Examples:
            >>> Verdict(int(Verdict.of(EMPTY=torch.tensor(True), WEIGHTS_DIFFER=torch.tensor(False))))
            <Verdict.EMPTY: 1>
        """
        return sum(flag.int() * Verdict[name] for name, flag in flags.items())  # type: ignore[return-value]
