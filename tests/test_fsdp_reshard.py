"""FSDP checkpoints resumed on another number of ranks: 2 ranks -> 1 and 1 -> 2, FSDP1 (``FSDPStrategy``) and
FSDP2 (``ModelParallelStrategy`` with ``fully_shard``), sharded and full checkpoints, on gloo.

Three launches of ``fsdp_reshard_fit.py`` (2 ranks, 1, 2) save every case mid-epoch at a step boundary and
resume it on the other number of ranks; Lightning reshards through torch.distributed.checkpoint (the model and
the SGD momentum), the loader and the rescaler continue under the new split. The final parameters must equal
the plain-PyTorch run that never stopped (``elastic.uninterrupted``). A checkpoint inside a window is refused
under FSDP when it is saved (``test_fsdp``), and when one saved under DDP is resumed under FSDP (below).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from elastic import uninterrupted
from fsdp_reshard_fit import CASES, SAVED_ON_ONE_RANK_ONLY
from lightning.pytorch.strategies import FSDPStrategy
from reference import relative_distance

from lightning_accum.resume import restore_partial_window

RESUMES = [
    f"{' '.join(case)} {before}->{after}"
    for case in CASES
    for before, after in ((2, 1), (1, 2))
    if not (case[:2] in SAVED_ON_ONE_RANK_ONLY and before > 1)
]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Every resume's final full parameters: launches on 2 ranks (save), 1 (resume, save), 2 (resume)."""
    root = tmp_path_factory.mktemp("fsdp_reshard")
    script = Path(__file__).with_name("fsdp_reshard_fit.py")
    for ranks in (2, 1, 2):
        subprocess.run([sys.executable, str(script), str(ranks), str(root)], check=True, cwd=root, timeout=300)
    return {**torch.load(root / "resumed-1.pt"), **torch.load(root / "resumed-2.pt")}


@pytest.mark.slow
@pytest.mark.parametrize("resume", RESUMES)
def test_fsdp_checkpoint_resumes_on_another_number_of_ranks(resumed, resume: str, measured) -> None:
    initial, final = uninterrupted()
    assert measured(relative_distance(resumed[resume], final, initial), resume) < 1e-5


def test_window_checkpoint_resumed_under_fsdp_is_refused_with_the_fix() -> None:
    window = {"totals": torch.zeros(2, 4), "grads": torch.zeros(2, 10)}  # saved inside a window on 2 DDP ranks
    trainer = SimpleNamespace(strategy=FSDPStrategy(), world_size=2, global_rank=0)
    with pytest.raises(RuntimeError, match=r"inside an accumulation window.*FSDPStrategy.*step boundary"):
        restore_partial_window(window, trainer, engine=None, params=[])
