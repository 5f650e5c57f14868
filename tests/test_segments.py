"""Per-document means in packed rows: ``sample_loss(token_losses, mask, segments=ids)`` makes each (row, document)
one item weighing its mean token loss; the steps match ``forms.forms_reference``, which averages each document
by a loop over the documents (independent of the library's scatter)."""

from __future__ import annotations

import pytest
import torch
from cases import EXACT_TOLERANCE, make_net
from forms import FormModule, ManualFormModule, fit_form, forms_reference, segments_case
from reference import flat_parameters, relative_distance

from lightning_accum import SampleCountMixin, SampleCountRescaler


@pytest.fixture(scope="module")
def reference():
    return forms_reference(make_net(), segments_case())


@pytest.mark.parametrize(("module_class", "mode"), [(FormModule, "deferred"), (FormModule, "lookahead"),
                                                    (ManualFormModule, "deferred")], ids=["deferred", "lookahead",
                                                                                         "manual"])  # fmt: skip
def test_document_means_across_micro_batches(module_class, mode: str, reference, measured) -> None:
    case = segments_case()
    module = module_class(make_net(), case)
    trainer = fit_form(case, module, [SampleCountRescaler(mode=mode)])
    distance = relative_distance(flat_parameters(module.net), reference.parameters, flat_parameters(make_net()))
    assert measured(distance) <= EXACT_TOLERANCE
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(reference.step_losses[-1], rel=1e-6)


@pytest.mark.parametrize(
    ("segments", "error", "message"),
    [
        (torch.tensor([[0, 0, 3]]), RuntimeError, r"document ids in \[0, row length\)"),
        (torch.tensor([[0, -1, 1]]), RuntimeError, r"document ids in \[0, row length\)"),
        (torch.tensor([[0.0, 0.0, 1.0]]), TypeError, "integer document ids"),
        (torch.tensor([0, 0, 1]), ValueError, r"segments has shape \(3,\) but losses have shape \(1, 3\)"),
    ],
    ids=["too_large", "negative", "float", "shape"],
)
def test_bad_segments_are_refused(segments, error, message) -> None:
    with pytest.raises(error, match=message):
        SampleCountMixin().sample_loss(torch.ones(1, 3), segments=segments)


def test_outside_training_the_batch_document_mean() -> None:
    losses = torch.tensor([[1.0, 3.0, 8.0, 0.0]])
    segments = torch.tensor([[2, 2, 0, 1]])
    mask = torch.tensor([[True, True, True, False]])  # document 1 has no counted token
    assert SampleCountMixin().sample_loss(losses, mask, segments=segments).item() == pytest.approx(5.0)
