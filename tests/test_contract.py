"""The backward contract without a Trainer: what a backward may carry, and the weight check's arithmetic."""

from __future__ import annotations

import pytest
import torch

from lightning_accum.contract import BackwardContract, gradient_totals, weights_differ
from lightning_accum.totals import WindowTotals


def outputs(*factors: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    w = torch.ones(3, requires_grad=True)
    return w, [(w * f).sum() for f in factors]


def recorded(contract: BackwardContract, *tensors: torch.Tensor) -> BackwardContract:
    contract.start_micro_batch()
    for tensor in tensors:
        contract.record(tensor)
    return contract


@pytest.mark.parametrize(
    "combine",
    [
        lambda a, b: a + b,
        lambda a, b: torch.stack([a, b]).sum(),
        lambda a, b: 0.25 * (a + b),
        lambda a, b: (a + b).clone() * torch.tensor(3.0),
        lambda a, b: sum([a, b]),
    ],
    ids=["plus", "stack_sum", "factor", "clone_tensor_factor", "builtin_sum"],
)
def test_plain_sums_and_uniform_factors_pass(combine) -> None:
    _, (a, b) = outputs(2.0, 3.0)
    recorded(BackwardContract(), a, b).check(combine(a, b))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda w, a, b: a + b + 0.1 * w.square().sum(), r"a term that is not a self\.sample_loss\(\.\.\.\) output"),
        (lambda w, a, b: a, r"computed 2 self\.sample_loss\(\.\.\.\) outputs .* only some of them"),
    ],
    ids=["added_term", "left_out"],
)
def test_added_terms_and_left_out_outputs_are_refused(build, match) -> None:
    w, (a, b) = outputs(2.0, 3.0)
    with pytest.raises(RuntimeError, match=match):
        recorded(BackwardContract("Model"), a, b).check(build(w, a, b))


def test_a_loss_without_graph_and_a_loss_without_outputs_are_refused() -> None:
    w, (a,) = outputs(2.0)
    with torch.no_grad():
        detached = (w * 2).sum()
    with pytest.raises(RuntimeError, match="without an autograd graph"):
        recorded(BackwardContract(), detached).check(detached)
    with pytest.raises(RuntimeError, match=r"did not come from self\.sample_loss"):
        recorded(BackwardContract()).check(a)


def test_logged_outputs_without_graph_are_not_required() -> None:
    w, (a,) = outputs(2.0)
    with torch.no_grad():
        logged = (w * 5).sum()
    recorded(BackwardContract(), a, logged).check(a)


def test_each_backward_needs_its_own_outputs() -> None:
    _, (a,) = outputs(2.0)
    contract = recorded(BackwardContract(), a)
    contract.check(a)
    with pytest.raises(RuntimeError, match="did not come from"):
        contract.check(a)  # the outputs were consumed by the first backward


def test_manual_optimization_messages_name_sample_backward() -> None:
    w, (a,) = outputs(2.0)
    contract = recorded(BackwardContract("Manual", helper="sample_backward"), a)
    with pytest.raises(RuntimeError, match=r"Manual backpropagated a term that is not a self\.sample_backward"):
        contract.check(a + w.sum())
    assert "sample_backward" in contract.weights_message()


def window_of(gradients: list[float]) -> WindowTotals:
    zero = torch.zeros((), dtype=torch.float64)
    outputs_, grad_sum, grad_squares = (
        torch.stack(part).sum()
        for part in zip(*(gradient_totals(torch.tensor(g, dtype=torch.float64)) for g in gradients), strict=True)
    )
    return WindowTotals(zero, zero, outputs_, grad_sum, grad_squares, zero, zero, zero)


@pytest.mark.parametrize(
    ("gradients", "differ"),
    [
        ([0.125] * 5, False),
        ([1 / 3] * 7, False),  # rounding of an inexact weight stays within the tolerance
        ([0.125, 0.125, 0.25], True),
        ([0.5, 0.5 * (1 + 1e-2)], True),
        ([0.5, 0.5 * (1 + 1e-4)], False),  # the check is quadratic: a 1e-4 relative difference is within 1e-6
        ([2.0], False),
    ],
)
def test_weights_differ_is_true_exactly_when_the_gradients_reaching_outputs_differ(gradients, differ) -> None:
    assert bool(weights_differ(window_of(gradients))) is differ
