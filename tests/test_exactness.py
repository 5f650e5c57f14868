"""The guarantee: final parameters match the plain-PyTorch full-batch reference; naive Lightning does not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cases import (
    EXACT_TOLERANCE,
    NAIVE_MINIMUM,
    Case,
    last_batch_smaller_case,
    make_net,
    make_optimizer,
    masked_ranks_case,
    reference_distance,
    uneven_ranks_case,
    varied_sizes_plan,
)
from fits import ExactModule, fit, fit_case
from reference import flat_parameters, item_losses, relative_distance, train_reference

from lightning_accum import SampleCountRescaler


def distances(case: Case, strategy: str = "auto", devices: int = 1) -> tuple[float, float]:
    """(exact, naive) relative distances of Lightning's final parameters to the reference."""
    initial = flat_parameters(make_net())
    reference = train_reference(
        make_net(), case.reference_windows(), make_optimizer(case.optimizer, case.lr), case.clip_norm, case.clip_value
    ).parameters
    exact = flat_parameters(fit_case(case, exact=True, strategy=strategy, devices=devices))
    naive = flat_parameters(fit_case(case, exact=False, strategy=strategy, devices=devices))
    return relative_distance(exact, reference, initial), relative_distance(naive, reference, initial)


@pytest.mark.parametrize("k", range(1, 9))
def test_last_batch_smaller_any_k(k: int, measured) -> None:
    exact, naive = distances(last_batch_smaller_case(k))
    assert measured(exact, "exact") <= EXACT_TOLERANCE
    if k == 1:  # one micro-batch per step in one process: the micro-batch mean already is the item mean
        assert measured(naive, "naive") <= EXACT_TOLERANCE
    else:
        assert measured(naive, "naive") > NAIVE_MINIMUM


def test_accumulation_schedule_changes_k_between_epochs(measured) -> None:
    case = Case(plan=varied_sizes_plan(), accumulation={0: 2, 1: 3, 2: 1, 3: 4}, epochs=4)
    exact, naive = distances(case)
    assert measured(exact, "exact") <= EXACT_TOLERANCE
    assert measured(naive, "naive") > NAIVE_MINIMUM


def test_token_masks_with_an_all_false_micro_batch(measured) -> None:
    plan = varied_sizes_plan(tokens=5, keep=0.5)
    x, y, mask = plan[0][1]
    plan[0][1] = (x, y, torch.zeros_like(mask))  # this micro-batch counts no token
    exact, naive = distances(Case(plan=plan, accumulation=3, epochs=3, optimizer="adamw", lr=0.05))
    assert measured(exact, "exact") <= EXACT_TOLERANCE
    assert measured(naive, "naive") > NAIVE_MINIMUM


@pytest.mark.parametrize("clip", [{"clip_norm": 0.3}, {"clip_value": 0.05}], ids=["norm", "value"])
def test_gradient_clipping_acts_on_the_exact_gradient(clip: dict, measured) -> None:
    exact, naive = distances(Case(plan=varied_sizes_plan(), accumulation=3, epochs=3, **clip))
    assert measured(exact, "exact") <= EXACT_TOLERANCE
    assert measured(naive, "naive") > NAIVE_MINIMUM


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_float_mask_of_zeros_and_ones(optimizer: str, measured) -> None:
    plan = [[(x, y, m.float()) for x, y, m in varied_sizes_plan(tokens=3, keep=0.7)[0]]]
    exact, _ = distances(Case(plan=plan, accumulation=4, epochs=2, optimizer=optimizer, lr=0.05))
    assert measured(exact, "exact") <= EXACT_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("case", [uneven_ranks_case, masked_ranks_case])
def test_ddp_spawn_two_ranks(case, measured) -> None:
    exact, naive = distances(case(), strategy="ddp_spawn", devices=2)
    assert measured(exact, "exact") <= EXACT_TOLERANCE
    assert measured(naive, "naive") > NAIVE_MINIMUM


@pytest.mark.slow
@pytest.mark.parametrize("case_name", ["uneven_ranks_case", "masked_ranks_case"])
def test_ddp_popen_two_ranks(case_name: str, tmp_path: Path, measured) -> None:
    import cases

    case = getattr(cases, case_name)()
    initial = flat_parameters(make_net())
    reference = train_reference(
        make_net(), case.reference_windows(), make_optimizer(case.optimizer, case.lr), case.clip_norm, case.clip_value
    ).parameters
    script = Path(__file__).with_name("ddp_fit.py")
    results = {}
    for mode in ("exact", "naive"):
        out = tmp_path / f"{mode}.pt"
        subprocess.run([sys.executable, str(script), case_name, mode, str(out)], check=True, cwd=tmp_path, timeout=300)
        results[mode] = relative_distance(torch.load(out), reference, initial)
    assert measured(results["exact"], "exact") <= EXACT_TOLERANCE
    assert measured(results["naive"], "naive") > NAIVE_MINIMUM


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
