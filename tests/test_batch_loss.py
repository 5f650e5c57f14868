"""Per-batch terms: ``sample_loss(ce, mask) + c * batch_loss(aux)`` steps on the item mean of ``ce`` plus ``c``
times the mean of ``aux`` over the window's micro-batches (look-ahead mode), against ``forms.forms_reference``;
the default mode refuses it at the first micro-batch, naming mode="lookahead"."""

from __future__ import annotations

import pytest
import torch
from cases import EXACT_TOLERANCE, make_net
from forms import FormModule, fit_form, forms_reference, terms_case, token_losses
from reference import flat_parameters, relative_distance

from lightning_accum import SampleCountRescaler


def test_terms_are_their_mean_over_the_window_micro_batches(measured) -> None:
    case = terms_case()
    reference = forms_reference(make_net(), case)
    module = FormModule(make_net(), case)
    trainer = fit_form(case, module, [SampleCountRescaler(mode="lookahead")])
    distance = relative_distance(flat_parameters(module.net), reference.parameters, flat_parameters(make_net()))
    assert measured(distance) <= EXACT_TOLERANCE
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(reference.step_losses[-1], rel=1e-6)


def test_default_mode_refuses_naming_lookahead() -> None:
    case = terms_case()
    with pytest.raises(RuntimeError, match=r"batch_loss\(term\) needs SampleCountRescaler\(mode='lookahead'\)"):
        fit_form(case, FormModule(make_net(), case), [SampleCountRescaler()])


class RawTermModule(FormModule):
    """A term from neither helper beside a batch_loss term."""

    def training_step(self, batch, batch_idx: int):
        ce = self.sample_loss(token_losses(self.net, batch), batch[2])
        return ce + self.batch_loss(self.net[0].weight.square().sum()) + 0.1 * self.net[2].weight.square().sum()


class VectorTermModule(FormModule):
    def training_step(self, batch, batch_idx: int):
        return self.sample_loss(token_losses(self.net, batch), batch[2]) + self.batch_loss(self.net[0].weight).sum()


@pytest.mark.parametrize(
    ("module_class", "message"),
    [
        (RawTermModule, r"a term that is not a self.sample_loss\(...\) output.*self.batch_loss\(term\)"),
        (VectorTermModule, r"batch_loss expects a 0-dim floating-point tensor"),
    ],
    ids=["raw_term", "vector_term"],
)
def test_other_terms_are_refused(module_class, message) -> None:
    case = terms_case()
    with pytest.raises((RuntimeError, ValueError), match=message):
        fit_form(case, module_class(make_net(), case), [SampleCountRescaler(mode="lookahead")])


def test_outside_training_the_term_is_itself() -> None:
    term = torch.tensor(2.5)
    assert FormModule(make_net(), terms_case()).batch_loss(term) is term


class SkippingModule(FormModule):
    """Skips its second micro-batch (returns None) in a window with terms."""

    def training_step(self, batch, batch_idx: int):
        return None if batch_idx == 1 else super().training_step(batch, batch_idx)


def test_a_counted_micro_batch_without_backward_is_refused_with_terms() -> None:
    case = terms_case()
    with pytest.raises(RuntimeError, match=r"never reached a backward, in a window with self\.batch_loss"):
        fit_form(case, SkippingModule(make_net(), case), [SampleCountRescaler(mode="lookahead")])


def test_the_contract_accepts_batch_loss_outputs_beside_sample_loss_outputs() -> None:
    from lightning_accum.contract import BackwardContract

    w = torch.ones(3, requires_grad=True)
    contract = BackwardContract("Model")
    items, term = (w * 2).sum(), w.square().sum()
    contract.record(items)
    contract.record_term(term)
    contract.check(items + 0.01 * term)  # accepted
    items, term = (w * 2).sum(), w.square().sum()
    contract.record(items)
    contract.record_term(term)
    with pytest.raises(RuntimeError, match="backpropagated only some of them"):
        contract.check(items)
