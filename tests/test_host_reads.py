"""No host synchronisation per micro-batch: the only tensor-to-host read the package makes is one per optimizer step.

Every read of one tensor value by the host (``.item()``, ``bool(t)``, ``float(t)``, ``int(t)``, ``if t:``)
dispatches to ``aten._local_scalar_dense``; on a GPU each one waits for the device. A dispatch mode records
those made while a frame of ``lightning_accum`` is on the Python stack, and in which function. This runs on
CPU; it proves what the code asks of the device, which is what ``torch.cuda.set_sync_debug_mode`` would
catch on a GPU.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from cases import Case, masked_tokens_case
from fits import fit_mode
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_accum

PACKAGE = str(Path(lightning_accum.__file__).parent)
HOST_READ = torch.ops.aten._local_scalar_dense.default


class PackageHostReads(TorchDispatchMode):
    """Counts host reads of tensor values by the innermost ``lightning_accum`` function on the stack."""

    def __init__(self) -> None:
        super().__init__()
        self.by_function: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is HOST_READ:
            ours = [frame.name for frame in traceback.extract_stack() if frame.filename.startswith(PACKAGE)]
            if ours:
                self.by_function[ours[-1]] += 1
        return func(*args, **(kwargs or {}))


def float_mask_case() -> Case:
    """``masked_tokens_case`` with 0/1 float masks, whose 0/1 check must not read the value on the host."""
    case = masked_tokens_case(epochs=2)
    case.plan = [[(x, y, mask.float()) for x, y, mask in case.plan[0]]]
    return case


@pytest.mark.parametrize("mode", ["deferred", "lookahead", "manual"])
@pytest.mark.parametrize("case", [masked_tokens_case, float_mask_case], ids=["bool_mask", "float_mask"])
def test_one_host_read_per_optimizer_step_none_per_micro_batch(case, mode: str) -> None:
    case = case()
    steps = len(case.reference_windows())
    with PackageHostReads() as reads:
        fit_mode(case, mode)
    micro_batches = len(case.plan[0]) * case.epochs
    assert micro_batches > steps  # several micro-batches per step, so a per-micro-batch read would show
    assert dict(reads.by_function) == {"finish_window": steps}  # the engine's verdict


def test_no_host_reads_that_the_dispatch_mode_cannot_see() -> None:
    # .tolist(), .numpy() and .cpu() read or copy on the host without reaching the dispatcher on CPU.
    # These modules handle device tensors per step (the sampler only draws host-side indices; resume.py copies
    # to the host when a checkpoint is saved).
    for name in (
        "callback",
        "engines",
        "mixin",
        "counting",
        "scaling",
        "window",
        "lookahead",
        "metrics",
        "support",
        "data/checks",
    ):
        source = Path(PACKAGE, f"{name}.py")
        text = source.read_text()
        for call in (".tolist(", ".numpy(", ".cpu("):
            assert call not in text, f"{source.name} calls {call}): read values with .item() or int()"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["deferred", "lookahead"])
@pytest.mark.parametrize("version", ["fsdp1", "fsdp2"])
def test_one_host_read_per_optimizer_step_under_fsdp(version: str, mode: str) -> None:
    from fsdp_fit import fit_sharded  # one rank in this process: FSDP over a process group of one

    case = masked_tokens_case(epochs=2)
    with PackageHostReads() as reads:
        fit_sharded(version, "cpu", case, "exact", "32-true", mode, keep_process_group=False)
    assert dict(reads.by_function) == {"finish_window": len(case.reference_windows())}
