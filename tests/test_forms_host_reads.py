"""The loss forms add no host read per micro-batch: still one per optimizer step (the engine's verdict)."""

from __future__ import annotations

import pytest
from cases import make_net
from forms import FormModule, ManualFormModule, fit_form, segments_case, terms_case, weights_case
from test_host_reads import PackageHostReads

from lightning_accum import SampleCountRescaler


@pytest.mark.parametrize(
    ("make_case", "module_class", "mode"),
    [
        (weights_case, FormModule, "deferred"),
        (weights_case, FormModule, "lookahead"),
        (weights_case, ManualFormModule, "deferred"),
        (terms_case, FormModule, "lookahead"),
        (segments_case, FormModule, "deferred"),
        (segments_case, ManualFormModule, "deferred"),
    ],
    ids=["weights", "weights-lookahead", "weights-manual", "terms-lookahead", "segments", "segments-manual"],
)
def test_one_host_read_per_optimizer_step(make_case, module_class, mode: str) -> None:
    case = make_case()
    steps = len(case.windows())
    with PackageHostReads() as reads:
        fit_form(case, module_class(make_net(), case), [SampleCountRescaler(mode=mode)])
    assert len(case.plan[0]) * case.epochs > steps
    assert dict(reads.by_function) == {"finish_window": steps}
