"""The guarantee, as one matrix: every mode, precision and strategy matches the plain-PyTorch full-batch
reference within the format's rounding, and the naive controls (no rescaler) are far from it.

The cells come from ``cases.MATRIX`` (a case of ``cases.CASES``, a mode, a precision and a strategy); each cell's
final parameters come from ``shared_fits`` (one fit per cell per session; every two-rank cell of a launcher in
one launch) and are compared with ``reference.train_reference``, which never imports lightning_accum.
Mode-specific behaviour (refusals, look-ahead's reading ahead, fp16's skipped steps) is tested in
``test_lookahead.py``, ``test_manual.py`` and ``test_precision.py``.
"""

from __future__ import annotations

import pytest
import torch
from cases import (
    CASES,
    EXACT_TOLERANCE,
    MATRIX,
    Case,
    Cell,
    case_reference,
    far_bound,
    make_net,
    reference_distance,
    tolerance,
    varied_sizes_plan,
)
from fits import ExactModule, fit
from reference import flat_parameters, item_losses, relative_distance

from lightning_accum import SampleCountRescaler


def matrix_params() -> list:
    return [
        pytest.param(cell, id=cell.id, marks=[pytest.mark.slow] if cell.strategy != "single" else []) for cell in MATRIX
    ]


@pytest.mark.parametrize("cell", matrix_params())
def test_final_parameters_against_the_reference(cell: Cell, shared_fits, measured) -> None:
    case, reference = CASES[cell.case](), case_reference(cell.case)
    distance = relative_distance(shared_fits.parameters(cell).float(), reference, flat_parameters(make_net()))
    for key in cell.figures or (None,):
        measured(distance, key=key)
    if cell.differs:
        assert distance > far_bound(cell.precision, case, reference)
    else:
        assert distance <= tolerance(cell.precision, case, reference)


class TwoHalvesModule(ExactModule):
    """Returns the sum of two ``sample_loss`` outputs (the two halves of each micro-batch): the same items."""

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        losses, mask = item_losses(self.net, batch)
        half = max(len(losses) // 2, 1)
        return self.sample_loss(losses[:half], mask[:half]) + self.sample_loss(losses[half:], mask[half:])


def test_sum_of_several_sample_loss_outputs(measured) -> None:
    case = Case(plan=varied_sizes_plan(tokens=3, keep=0.6), accumulation=3, epochs=2)
    module = TwoHalvesModule(make_net(), case)
    fit(case, module, [SampleCountRescaler()])
    assert measured(reference_distance(case, module.net)) <= EXACT_TOLERANCE
