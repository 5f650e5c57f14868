"""The guarantee on sharded gradients: FSDP1 (``FSDPStrategy``) and FSDP2 (``ModelParallelStrategy`` with
``fully_shard``), 2 ranks on gloo, both modes, 32-true and bf16-mixed, against the plain-PyTorch reference.

One script run (``fsdp_fit.py``) fits every case under both FSDP versions and saves the final full parameters;
the tests below share it. The cases: uneven micro-batches and ranks (``uneven_ranks``), a partial last window
(``partial_window``), token masks with an empty micro-batch, an empty rank share and an empty window, AdamW and
clipping by norm (``masked_ranks``; ``clipped_ranks`` clips at a norm that some steps exceed and others not).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cases import (
    NAIVE_MINIMUM,
    clipped_ranks_case,
    flat_reference_distance,
    masked_ranks_case,
    partial_window_ranks_case,
    tolerance,
    uneven_ranks_case,
)
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from lightning_accum.support import require_supported_strategy

CASES = {
    "masked_ranks": masked_ranks_case,
    "uneven_ranks": uneven_ranks_case,
    "partial_window": partial_window_ranks_case,
    "clipped_ranks": clipped_ranks_case,
}
EXACT_FITS = [
    ("masked_ranks", "32-true", "deferred"),
    ("masked_ranks", "32-true", "lookahead"),
    ("masked_ranks", "bf16-mixed", "deferred"),
    ("masked_ranks", "bf16-mixed", "lookahead"),
    ("uneven_ranks", "32-true", "deferred"),
    ("partial_window", "32-true", "deferred"),
    ("partial_window", "32-true", "lookahead"),
    ("clipped_ranks", "32-true", "deferred"),
    ("clipped_ranks", "32-true", "lookahead"),
]


VERSIONS = ("fsdp1", "fsdp2")


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder where one two-rank run of ``fsdp_fit.py`` saved both versions' results (``<version>.pt``)."""
    folder = tmp_path_factory.mktemp("fsdp")
    script = Path(__file__).with_name("fsdp_fit.py")
    command = [sys.executable, str(script), ",".join(VERSIONS), str(folder / "{version}.pt")]
    subprocess.run(command, check=True, cwd=folder, timeout=500)
    return folder


@pytest.fixture(scope="module", params=VERSIONS)
def sharded_fits(request: pytest.FixtureRequest, sharded_runs: Path) -> tuple[str, dict]:
    """(version, results of ``fsdp_fit.py``): one two-rank script run for both FSDP versions, shared by the tests."""
    return request.param, torch.load(sharded_runs / f"{request.param}.pt")


@pytest.mark.slow
@pytest.mark.parametrize(("case_name", "precision", "mode"), EXACT_FITS)
def test_sharded_gradients_match_the_reference(
    sharded_fits: tuple[str, dict], case_name: str, precision: str, mode: str, measured
) -> None:
    version, results = sharded_fits
    case = CASES[case_name]()
    parameters = results[f"{case_name} {precision} {mode}"]
    distance = flat_reference_distance(case, parameters)
    assert measured(distance, version) <= tolerance(precision, case)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["SHARD_GRAD_OP", "NO_SHARD"])
def test_fsdp1_other_sharding_strategies_match_the_reference(
    sharded_fits: tuple[str, dict], sharding: str, measured
) -> None:
    version, results = sharded_fits
    if version != "fsdp1":
        pytest.skip("FSDP1's sharding strategies")
    case = masked_ranks_case()
    distance = flat_reference_distance(case, results[f"masked_ranks 32-true deferred {sharding}"])
    assert measured(distance, sharding) <= tolerance("32-true", case)


@pytest.mark.slow
def test_naive_fsdp_is_far_from_the_reference(sharded_fits: tuple[str, dict], measured) -> None:
    version, results = sharded_fits
    distance = flat_reference_distance(masked_ranks_case(), results["masked_ranks 32-true naive"])
    assert measured(distance, f"{version} naive") > NAIVE_MINIMUM


@pytest.mark.slow
def test_checkpoint_inside_a_window_is_refused_with_the_fix(sharded_fits: tuple[str, dict]) -> None:
    _, results = sharded_fits
    assert "cannot save a checkpoint inside an accumulation window" in results["refused"]
    assert "every_n_train_steps" in results["refused"]


def test_fsdp_strategies_are_accepted_at_the_verified_precisions() -> None:
    require_supported_strategy(FSDPStrategy(precision_plugin=FSDPPrecision("32-true")))
    require_supported_strategy(FSDPStrategy(precision_plugin=FSDPPrecision("bf16-mixed")))
    require_supported_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-true", "16-true"])
def test_fsdp_at_an_unverified_precision_fails_with_the_fix(precision: str) -> None:
    with pytest.raises(RuntimeError, match=rf"FSDPStrategy at precision='{precision}'.*'32-true' or 'bf16-mixed'"):
        require_supported_strategy(FSDPStrategy(precision_plugin=FSDPPrecision(precision)))


def test_tensor_parallelism_fails_with_the_fix() -> None:
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    with pytest.raises(RuntimeError, match=r"tensor_parallel_size=2.*tensor_parallel_size=1"):
        require_supported_strategy(strategy)


def test_hybrid_sharding_fails_with_the_fix() -> None:
    with pytest.raises(RuntimeError, match=r"HYBRID_SHARD.*'FULL_SHARD'"):
        require_supported_strategy(FSDPStrategy(sharding_strategy="HYBRID_SHARD", auto_wrap_policy={torch.nn.Linear}))
