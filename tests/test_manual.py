"""Manual optimization: ``sample_backward`` in a user's own loop matches the reference; misuse names the helper."""

from __future__ import annotations

import pytest
from cases import EXACT_TOLERANCE, Case, make_net, masked_tokens_case, reference_distance, tolerance, varied_sizes_plan
from fits import ManualModule, fit, fit_manual_net
from reference import item_losses

from lightning_accum import SampleCountRescaler


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"])
def test_own_loop_with_clipping_matches_the_reference(precision: str, measured) -> None:
    case = masked_tokens_case()  # steps after every 3 micro-batches and at the epoch's end; clip norm 0.5
    assert measured(reference_distance(case, fit_manual_net(case, precision))) <= tolerance(precision, case)


def test_window_length_changing_between_epochs() -> None:
    case = Case(plan=varied_sizes_plan(tokens=3, keep=0.6), accumulation={0: 2, 1: 3, 2: 1, 3: 4}, epochs=4)
    assert reference_distance(case, fit_manual_net(case)) <= EXACT_TOLERANCE


class NaiveManualModule(ManualModule):
    def training_step(self, batch, batch_idx: int) -> None:
        losses, mask = item_losses(self.net, batch)
        self.manual_backward((losses * mask).sum() / mask.sum().clamp_min(1) / self.case.k_at(self.current_epoch))
        if (batch_idx + 1) % self.case.k_at(self.current_epoch) == 0 or self.trainer.is_last_batch:
            optimizer = self.optimizers()
            optimizer.step()
            optimizer.zero_grad()


def test_naive_manual_loop_is_wrong() -> None:
    case = masked_tokens_case()
    module = NaiveManualModule(make_net(), case)
    fit(Case(plan=case.plan, epochs=case.epochs), module, [])
    assert reference_distance(case, module.net) > 0.1


class SampleLossInManualModule(ManualModule):
    def training_step(self, batch, batch_idx: int) -> None:
        losses, mask = item_losses(self.net, batch)
        self.manual_backward(self.sample_loss(losses, mask))


class OwnBackwardModule(ManualModule):
    def training_step(self, batch, batch_idx: int) -> None:
        losses, mask = item_losses(self.net, batch)
        self.manual_backward(losses[mask].mean())


@pytest.mark.parametrize(
    ("module_class", "message"),
    [
        (SampleLossInManualModule, r"manual optimization: call `self.sample_backward\(losses, mask\)`"),
        (OwnBackwardModule, r"did not come from self.sample_backward"),
    ],
)
def test_manual_misuse_names_the_helper(module_class, message: str) -> None:
    case = Case(plan=varied_sizes_plan(), epochs=1)
    with pytest.raises(RuntimeError, match=message):
        fit(case, module_class(make_net(), case), [SampleCountRescaler()])


def test_lookahead_with_manual_optimization_names_the_default_mode() -> None:
    case = Case(plan=varied_sizes_plan(), epochs=1)
    with pytest.raises(RuntimeError, match=r"mode='lookahead'\) needs automatic optimization.*sample_backward"):
        fit(case, ManualModule(make_net(), case), [SampleCountRescaler(mode="lookahead")])


def test_sample_backward_with_automatic_optimization_names_sample_loss() -> None:
    case = Case(plan=varied_sizes_plan(), epochs=1)
    module = ManualModule(make_net(), case)
    module.automatic_optimization = True
    module.training_step = lambda batch, batch_idx: module.sample_backward(item_losses(module.net, batch)[0])
    with pytest.raises(RuntimeError, match=r"return `self.sample_loss\(losses, mask\)` instead"):
        fit(case, module, [SampleCountRescaler()])
