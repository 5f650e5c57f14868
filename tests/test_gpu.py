"""The GPU suite (marker ``gpu``, skipped without CUDA; ``scripts/run_gpu_suite.sh`` runs it and prints the figures).

On CUDA: no host synchronisation per micro-batch (``torch.cuda.set_sync_debug_mode("error")`` around every
per-micro-batch entry point of the package) and exactly one per optimizer step (the verdict's ``int``); real
``16-mixed`` with its CUDA GradScaler; the exactness cases against the CPU float32 reference; two DDP ranks on
one GPU over gloo; FSDP1 and FSDP2 (one rank on one GPU; two ranks where two GPUs exist). float32 products run
without TF32, as the reference computes them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from cases import (
    EXACT_TOLERANCE,
    NAIVE_MINIMUM,
    Case,
    clipped_ranks_case,
    empty_windows_case,
    flat_reference_distance,
    last_batch_smaller_case,
    make_net,
    masked_ranks_case,
    masked_tokens_case,
    partial_window_ranks_case,
    reference_distance,
    tolerance,
    uneven_ranks_case,
)
from fits import CountingModule, NaiveModule, fit, free_port, precision_kwargs

from lightning_accum import SampleCountRescaler
from lightning_accum.engines import WeightingEngine
from lightning_accum.window import ItemWindow

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PER_MICRO_BATCH = [
    (SampleCountRescaler, "micro_batch_loss"),
    (SampleCountRescaler, "on_train_batch_start"),
    (SampleCountRescaler, "on_before_zero_grad"),
    (SampleCountRescaler, "on_before_backward"),
    (ItemWindow, "add"),  # the backward hook that counts a micro-batch
]
SYNC_WARNING = "synchroniz"  # torch's warning: "called a synchronizing CUDA operation"


@pytest.fixture(autouse=True)
def float32_products() -> Iterator[None]:
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def in_sync_mode(function: Callable, mode: str) -> Callable:
    def wrapped(*args, **kwargs):
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(mode)
        try:
            return function(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    return wrapped


def counting_syncs(function: Callable, counter: Counter) -> Callable:
    """``function`` under sync debug mode "warn"; each synchronisation it makes adds 1 to ``counter[name]``."""

    def wrapped(*args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = in_sync_mode(function, "warn")(*args, **kwargs)
        counter[function.__name__] += sum(SYNC_WARNING in str(w.message) for w in caught)
        return result

    return wrapped


def fit_on_gpu(case: Case, module, mode: str = "deferred", precision: str = "32-true", **kwargs):
    callbacks = [SampleCountRescaler(mode=mode)] if mode else []
    return fit(case, module, callbacks, accelerator="gpu", devices=1, **precision_kwargs(precision, "cuda"), **kwargs)


def distance_on_cpu(case: Case, net: torch.nn.Module) -> float:
    return reference_distance(case, net.cpu())


@pytest.mark.parametrize("mode", ["deferred", "lookahead"])
def test_no_sync_per_micro_batch_one_per_step(mode: str, monkeypatch: pytest.MonkeyPatch, measured) -> None:
    for owner, name in PER_MICRO_BATCH:
        monkeypatch.setattr(owner, name, in_sync_mode(getattr(owner, name), "error"))  # a sync raises there
    steps: Counter = Counter()
    monkeypatch.setattr(WeightingEngine, "finish_window", counting_syncs(WeightingEngine.finish_window, steps))
    case = masked_tokens_case()
    module = CountingModule(make_net(), case)
    fit_on_gpu(case, module, mode)
    assert len(case.plan[0]) * case.epochs > len(case.reference_windows())  # several micro-batches per step
    assert dict(steps) == {"finish_window": len(case.reference_windows())}  # int(verdict): one per step
    assert measured(distance_on_cpu(case, module.net)) <= EXACT_TOLERANCE


@pytest.mark.parametrize("mode", ["deferred", "lookahead"])
def test_fp16_with_its_grad_scaler(mode: str, measured) -> None:
    case = masked_tokens_case()
    module = CountingModule(make_net(), case)
    trainer = fit_on_gpu(case, module, mode, "16-mixed")
    scaler = trainer.precision_plugin.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()  # real fp16 loss scaling on CUDA
    assert measured(distance_on_cpu(case, module.net)) <= tolerance("16-mixed", case)


EXACTNESS = [
    ("last_batch_smaller_k3", lambda: last_batch_smaller_case(3), "32-true"),
    ("masked_tokens", masked_tokens_case, "32-true"),
    ("masked_tokens", masked_tokens_case, "bf16-mixed"),
    ("masked_tokens", masked_tokens_case, "bf16-true"),
    ("empty_windows", empty_windows_case, "32-true"),
]


@pytest.mark.parametrize("mode", ["deferred", "lookahead"])
@pytest.mark.parametrize(("name", "make_case", "precision"), EXACTNESS, ids=[f"{n}-{p}" for n, _, p in EXACTNESS])
def test_exactness_cases(name: str, make_case, precision: str, mode: str, measured) -> None:
    case = make_case()
    module = CountingModule(make_net(), case)
    if name == "empty_windows":
        with pytest.warns(UserWarning, match="saw no counted items"):
            fit_on_gpu(case, module, mode, precision)
    else:
        fit_on_gpu(case, module, mode, precision)
    assert measured(distance_on_cpu(case, module.net)) <= tolerance(precision, case)


def test_naive_is_wrong_on_cuda_too(measured) -> None:
    case = last_batch_smaller_case(3)
    module = NaiveModule(make_net(), case)
    fit_on_gpu(case, module, mode="")
    assert measured(distance_on_cpu(case, module.net), "naive") > NAIVE_MINIMUM


def test_ddp_two_ranks_on_one_gpu_over_gloo(tmp_path: Path, measured) -> None:
    out = tmp_path / "results.pt"
    script = Path(__file__).with_name("gpu_ddp_fit.py")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "LOCAL_RANK": "0"}
    ranks = [
        subprocess.Popen([sys.executable, str(script), str(out)], env={**env, "NODE_RANK": str(rank)}, cwd=tmp_path)
        for rank in (0, 1)
    ]
    assert [rank.wait(timeout=500) for rank in ranks] == [0, 0]
    results = torch.load(out)
    case = masked_ranks_case()
    assert set(results) == {"32-true deferred", "32-true lookahead", "bf16-mixed deferred", "16-mixed deferred"}
    for label, parameters in results.items():
        precision = label.split()[0]
        assert measured(flat_reference_distance(case, parameters), label) <= tolerance(precision, case)


@pytest.mark.parametrize("mode", ["deferred", "lookahead"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("version", ["fsdp1", "fsdp2"])
def test_fsdp_one_rank_on_one_gpu(version: str, precision: str, mode: str, measured) -> None:
    from fsdp_fit import fit_sharded

    case = masked_tokens_case()
    parameters = fit_sharded(version, "cuda", case, "exact", precision, mode, keep_process_group=False)
    assert measured(flat_reference_distance(case, parameters)) <= tolerance(precision, case)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two FSDP ranks need two GPUs (NCCL: one rank per GPU)")
@pytest.mark.parametrize("version", ["fsdp1", "fsdp2"])
def test_fsdp_two_ranks_on_two_gpus(version: str, tmp_path: Path, measured) -> None:
    out = tmp_path / "results.pt"
    script = Path(__file__).with_name("fsdp_fit.py")
    subprocess.run([sys.executable, str(script), version, str(out), "cuda"], check=True, cwd=tmp_path, timeout=500)
    results = torch.load(out)
    cases = {
        "masked_ranks": masked_ranks_case(),
        "uneven_ranks": uneven_ranks_case(),
        "partial_window": partial_window_ranks_case(),
        "clipped_ranks": clipped_ranks_case(),
    }
    for label, parameters in results.items():
        if label == "refused":
            assert "every_n_train_steps" in parameters
            continue
        name, precision, mode = label.split()[:3]
        distance = measured(flat_reference_distance(cases[name], parameters), label)
        assert distance > NAIVE_MINIMUM if mode == "naive" else distance <= tolerance(precision, cases[name])
