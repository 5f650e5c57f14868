"""Manual optimization: misuse names the helper.

A user's own loop with ``sample_backward`` (``fits.ManualModule``) and its naive control are in the matrix
(``test_exactness.py``, modes ``manual`` and ``naive-manual``)."""

from __future__ import annotations

import pytest
from cases import Case, make_net, varied_sizes_plan
from fits import ManualModule, fit
from reference import item_losses

from lightning_accum import SampleCountRescaler


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
