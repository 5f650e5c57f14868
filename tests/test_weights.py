"""Per-item weights: ``sample_loss(losses, mask, weight=w)`` steps on ``sum(w * grad l) / sum(w)`` over every
counted item of the window, against the plain-PyTorch reference in ``forms.py``; bad weights are refused."""

from __future__ import annotations

import math

import pytest
import torch
from cases import EXACT_TOLERANCE, make_net, tolerance
from fits import precision_kwargs
from forms import FormModule, ManualFormModule, fit_form, forms_reference, token_losses, weighted_batch, weights_case
from reference import flat_parameters, relative_distance

from lightning_accum import SampleCountRescaler


@pytest.fixture(scope="module")
def reference():
    return forms_reference(make_net(), weights_case())


def distance(net, reference) -> float:
    return relative_distance(flat_parameters(net), reference.parameters, flat_parameters(make_net()))


@pytest.mark.parametrize("mode", ["deferred", "lookahead"])
def test_weighted_steps_and_logs_are_the_weighted_mean(mode: str, reference, measured) -> None:
    case = weights_case()
    module = FormModule(make_net(), case)
    trainer = fit_form(case, module, [SampleCountRescaler(mode=mode)])
    assert measured(distance(module.net, reference)) <= EXACT_TOLERANCE
    assert trainer.global_step == 6  # the window whose weights sum to 0 still counts as a step, without update
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(reference.step_losses[-1], rel=1e-6)
    assert math.isnan(reference.step_losses[1])


def test_manual_optimization(reference, measured) -> None:
    case = weights_case()
    module = ManualFormModule(make_net(), case)
    with pytest.warns(UserWarning, match="saw no counted items"):
        fit_form(case, module, [SampleCountRescaler()])
    assert measured(distance(module.net, reference)) <= EXACT_TOLERANCE


@pytest.mark.parametrize("precision", ["64-true", "bf16-mixed", "16-mixed"])
def test_precisions(precision: str, reference, measured) -> None:
    case = weights_case()
    module = FormModule(make_net(), case)
    fit_form(case, module, [SampleCountRescaler()], **precision_kwargs(precision))
    assert measured(distance(module.net, reference)) <= tolerance(precision, None)


class BadWeightModule(FormModule):
    def training_step(self, batch, batch_idx: int):
        _, _, mask, weight = batch
        return self.sample_loss(token_losses(self.net, batch), mask, weight=self.bad(weight))


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (lambda w: -w, RuntimeError, "weight must be finite and non-negative"),
        (lambda w: w.masked_fill(w > 1, float("nan")), RuntimeError, "weight must be finite and non-negative"),
        (lambda w: w.masked_fill(w > 1, float("inf")), RuntimeError, "weight must be finite and non-negative"),
        (lambda w: w[:, :1], ValueError, r"weight has shape \(4, 1\) but losses have shape \(4, 3\)"),
        (lambda w: (w > 1).long(), TypeError, "weight must hold floating-point numbers"),
        (lambda w: [1.0], TypeError, "weight must be a tensor"),
    ],
    ids=["negative", "nan", "inf", "shape", "integer", "list"],
)
def test_bad_weights_are_refused(bad, error, message) -> None:
    case = weights_case()
    case.plan[0][0] = weighted_batch(4, seed=7)
    module = BadWeightModule(make_net(), case)
    module.bad = bad
    with pytest.raises(error, match=message):
        fit_form(case, module, [SampleCountRescaler()])


def test_weight_and_segments_together_are_refused() -> None:
    from lightning_accum import SampleCountMixin

    with pytest.raises(ValueError, match="weight or segments, not both"):
        SampleCountMixin().sample_loss(torch.ones(2, 3), weight=torch.ones(2, 3), segments=torch.zeros(2, 3).long())
