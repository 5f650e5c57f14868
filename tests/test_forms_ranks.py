"""The loss forms on 2 ranks: one launch of ``forms_ranks_fit.py`` (DDP, FSDP1, FSDP2 fits and a validation with
uneven ranks), each result against the plain-PyTorch reference of ``forms.py`` over both ranks' micro-batches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cases import EXACT_TOLERANCE, make_net
from fits import clean_env
from forms import eval_reference, forms_reference, segments_ranks_case, terms_ranks_case, weights_ranks_case
from forms_ranks_fit import FITS, VAL_PLAN, VAL_SEQUENCES
from reference import flat_parameters, relative_distance

pytestmark = pytest.mark.slow
CASES = {"weights": weights_ranks_case, "terms": terms_ranks_case, "segments": segments_ranks_case}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("forms_ranks")
    out = folder / "results.pt"
    script = Path(__file__).with_name("forms_ranks_fit.py")
    subprocess.run([sys.executable, str(script), str(out)], check=True, cwd=folder, timeout=600, env=clean_env())
    return torch.load(out)


@pytest.mark.parametrize("label", [label for label, *_ in FITS])
def test_two_ranks_match_the_reference(label: str, results: dict, measured) -> None:
    reference = forms_reference(make_net(), CASES[label.split()[0]]())
    distance = relative_distance(results[label], reference.parameters, flat_parameters(make_net()))
    assert measured(distance) <= EXACT_TOLERANCE


def test_validation_mean_over_uneven_ranks(results: dict, measured) -> None:
    net = make_net()
    torch.nn.utils.vector_to_parameters(results["validate net"], net.parameters())
    expected = eval_reference(net, VAL_PLAN)
    assert measured(abs(results["validate"]["val/item_loss"] / expected - 1)) <= 1e-6
    assert abs(results["validate"]["val/batch_mean"] / expected - 1) > 1e-3  # Lightning's own epoch mean


def test_validation_through_a_global_batch_loader_counts_no_padding(results: dict, measured) -> None:
    """Rank 1's padding micro-batch (a real sequence fetched in its place) adds nothing to the mean."""
    net = make_net()
    torch.nn.utils.vector_to_parameters(results["validate net"], net.parameters())
    expected = eval_reference(net, [[VAL_SEQUENCES]])
    assert measured(abs(results["validate global loader"]["val/item_loss"] / expected - 1)) <= 1e-6
