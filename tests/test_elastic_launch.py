"""Elastic runs through torchrun on localhost: 2 nodes -> 1 node, and ``--max-restarts`` after a killed rank.

Each launch runs ``tests/elastic_fit.py``, whose split follows the ranks (K = 8 / (ranks x B)); the final parameters
must equal the plain-PyTorch run that never stopped (``elastic.uninterrupted``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from app_runs import run, run_torchrun_nodes
from elastic import MID_EPOCH, uninterrupted
from fits import free_port
from reference import relative_distance

pytestmark = pytest.mark.slow

FIT = str(Path(__file__).resolve().parent / "elastic_fit.py")


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--master_port={free_port()}", *args]


@pytest.fixture(scope="module")
def reference():
    return uninterrupted()


def test_two_torchrun_nodes_resume_on_one_node(tmp_path, reference, measured) -> None:
    # 2 nodes x 1 rank x K=2 x B=2 stop after 6 steps (mid-epoch 1); 1 node x 1 rank x K=4 x B=2 resumes.
    run_torchrun_nodes([FIT, str(tmp_path), str(tmp_path / "unused.pt"), f"--stop-step={MID_EPOCH}"], 2, tmp_path)
    assert (tmp_path / "progress.txt").read_text().split() == [str(MID_EPOCH), "2"]
    out = tmp_path / "resumed.pt"
    resume = f"--resume={tmp_path / 'split.ckpt'}"
    run([*torchrun("--nproc_per_node=1"), FIT, str(tmp_path), str(out), resume], tmp_path)
    assert (tmp_path / "progress.txt").read_text().split() == ["12", "1"]
    initial, final = reference
    assert measured(relative_distance(torch.load(out), final, initial)) < 1e-5


def test_torchrun_max_restarts_resumes_from_the_last_checkpoint(tmp_path, reference, measured) -> None:
    # 2 ranks x K=2 x B=2, a checkpoint at every step; rank 1 is SIGKILLed inside the window after step 5 (its first
    # micro-batch done). torchrun stops rank 0, starts both again, and they resume from step 5's checkpoint.
    # The c10d rendezvous gives each attempt its own store: with the static one (--master_port) the restarted rank 0
    # can read the killed rank's gloo address from the first attempt and fail to connect.
    args = [FIT, str(tmp_path), str(tmp_path / "final.pt"), "--every-step", "--kill-rank=1", "--kill-step=5"]
    elastic = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--nnodes=1", "--nproc_per_node=2"]
    launch = [sys.executable, "-m", "torch.distributed.run", *elastic, "--max-restarts=1", "--monitor-interval=0.5"]
    run([*launch, *args], tmp_path)
    initial, final = reference
    assert measured(relative_distance(torch.load(tmp_path / "final.pt"), final, initial)) < 1e-5
    assert (tmp_path / "progress.txt").read_text().split() == ["12", "2"]
    # Attempt 0 started at step 0, attempt 1 (after the kill) at step 5, both on 2 ranks.
    assert (tmp_path / "starts.txt").read_text().splitlines() == ["0 0 2", "1 5 2"]
