"""Precision's own behaviour: fp16's dynamic loss scaling skips exactly the overflowed windows, an empty
window leaves the optimizer state alone, and unverified strategies and plugins are refused.

Every precision's exactness (64-true to bf16-true, in every mode, in one process and on two ranks) is in the
matrix (``test_exactness.py``), against the float32 reference within the format's rounding budget
(``cases.tolerance``)."""

from __future__ import annotations

import pytest
import torch
from cases import (
    Case,
    empty_windows_case,
    make_net,
    masked_tokens_case,
    reference_distance,
    tolerance,
)
from fits import CountingModule, fit, fp16_scaler_plugin
from lightning.pytorch.plugins.precision import DeepSpeedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy

from lightning_accum import SampleCountRescaler
from lightning_accum.support import require_supported_precision, require_supported_strategy


def overflow_case() -> Case:
    """``masked_tokens_case`` where micro-batch 4 (window 1 of each epoch) holds a masked-out token whose
    features overflow float16 (1e6 > 65504): its loss is excluded, but its gradient is nan in fp16."""
    case = masked_tokens_case()
    x, y, mask = case.plan[0][4]
    x, mask = x.clone(), mask.clone()
    x[0, 0], mask[0, 0] = 1e6, False
    case.plan[0][4] = (x, y, mask)
    return case


@pytest.mark.parametrize("mode", ["deferred", "lookahead"])
def test_fp16_step_skipped_for_overflow_drops_exactly_its_window(mode: str) -> None:
    case = overflow_case()
    module = CountingModule(make_net(), case)
    plugin = fp16_scaler_plugin(init_scale=2.0**10, backoff_factor=0.5, growth_interval=10**6)
    trainer = fit(case, module, [SampleCountRescaler(mode=mode)], plugins=[plugin])
    assert plugin.scaler.get_scale() == 2.0**10 * 0.5**3  # three skipped steps (one per epoch), nothing else
    assert trainer.global_step == 9  # Lightning still counts them
    skipped = (1, 4, 7)  # window 1 of each of the 3 epochs, 3 windows per epoch
    assert reference_distance(case, module.net, skip_windows=skipped) <= tolerance("16-mixed", case)
    assert reference_distance(case, module.net) > 10 * tolerance("16-mixed", case)


@pytest.mark.parametrize("mode", ["deferred", "lookahead"])
def test_fp16_empty_window_leaves_optimizer_state_untouched(mode: str) -> None:
    case = empty_windows_case()  # window 2 of each epoch is empty
    module = CountingModule(make_net(), case)
    with pytest.warns(UserWarning, match="saw no counted items"):
        trainer = fit(case, module, [SampleCountRescaler(mode=mode)], plugins=[fp16_scaler_plugin()])
    assert {int(s["step"]) for s in trainer.optimizers[0].state.values()} == {4}  # 6 windows, 2 empty
    assert reference_distance(case, module.net) <= tolerance("16-mixed", case)


def test_strategies_that_own_the_step_fail_with_the_alternative() -> None:
    # DeepSpeed is not installed here (created without __init__). FSDP is verified: tests/test_fsdp.py.
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    with pytest.raises(RuntimeError, match=r"does not support the DeepSpeedStrategy strategy.*'ddp'.*FSDPStrategy"):
        require_supported_strategy(strategy)


def test_unverified_precision_plugin_fails_with_the_alternative() -> None:
    message = r"not verified with the DeepSpeedPrecision.*precision='32-true', '64-true', '16-mixed'"
    with pytest.raises(RuntimeError, match=message):
        require_supported_precision(DeepSpeedPrecision("32-true"))
    require_supported_precision(fp16_scaler_plugin())  # the fp16 plugin of these tests is supported


def test_fp16_scaler_plugin_is_real_fp16_on_cpu() -> None:
    plugin = fp16_scaler_plugin()
    with plugin.forward_context():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
