"""A user's own Hydra project adopts the package (docs/adopt.md): a two-split sweep through it is exact.

Copies docs/examples/hydra_project/ (its own configs, outside conf/; lightning-hydra-template's layout) into a
fresh folder and runs its sweep ``+split=one_process,two_ranks``: 1 process x K=4 x 8 and 2 ranks (ddp_spawn)
x K=2 x 8, the same 32 samples per optimizer step, about 30 % of them unlabelled (masked). Both runs must
land on the plain-PyTorch reference (each step the mean over the window's labelled samples), and the naive
weighting (each micro-batch's mean, divided by K) must not, so the test can tell them apart.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fits import clean_env
from reference import flat_parameters, relative_distance, train_reference
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ROOT / "docs" / "examples" / "hydra_project"
SAMPLES, WINDOW, EPOCHS, LR = 96, 32, 2, 0.1  # the project's configs: data, splits, trainer, model


def net_with(parameters: list[torch.Tensor]) -> nn.Module:
    """The project's network, built here, holding ``parameters``."""
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        for p, value in zip(net.parameters(), parameters, strict=True):
            p.copy_(value)
    return net


def naive_parameters(net: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, micro: int) -> torch.Tensor:
    """Lightning's own weighting in one process: each micro-batch's mean over its labelled samples, / K."""
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    for _ in range(EPOCHS):
        for start in range(0, SAMPLES, k * micro):
            optimizer.zero_grad()
            for first in range(start, start + k * micro, micro):
                xb, yb = x[first : first + micro], y[first : first + micro]
                losses = nn.functional.cross_entropy(net(xb), yb, reduction="none", ignore_index=-100)
                (losses[yb != -100].mean() / k).backward()
            optimizer.step()
    return flat_parameters(net)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[torch.Tensor]]]:
    """Each split's initial and final parameters, from the user project's sweep."""
    folder = tmp_path_factory.mktemp("user")
    project = folder / "project"
    shutil.copytree(PROJECT, project, ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "train.py", "-m", "+split=one_process,two_ranks", f"hydra.sweep.dir={folder / 'sweep'}"]
    done = subprocess.run(command, cwd=project, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = {
        name: torch.load(folder / "sweep" / num / "parameters.pt") for num, name in (("0", "1x4x8"), ("1", "2x2x8"))
    }
    runs["stderr"] = done.stderr  # type: ignore[assignment]
    return runs


@pytest.mark.slow
def test_two_splits_of_the_user_project_land_on_the_plain_reference(sweep, measured) -> None:
    sys.path.insert(0, str(PROJECT))
    try:
        from project.data import make_dataset  # the user's data, not the package's
    finally:
        sys.path.remove(str(PROJECT))
    x, y = make_dataset(SAMPLES).tensors
    initial = sweep["1x4x8"]["initial"]
    assert all(torch.equal(a, b) for a, b in zip(initial, sweep["2x2x8"]["initial"], strict=True))
    windows = [[(x[s : s + WINDOW], y[s : s + WINDOW], y[s : s + WINDOW] != -100)] for s in range(0, SAMPLES, WINDOW)]
    sgd = lambda net: torch.optim.SGD(net.parameters(), lr=LR)  # noqa: E731
    reference = train_reference(net_with(initial), windows * EPOCHS, sgd).parameters
    theta0 = torch.cat([p.reshape(-1) for p in initial])
    finals = {name: torch.cat([p.reshape(-1) for p in sweep[name]["final"]]) for name in ("1x4x8", "2x2x8")}
    for name, final in finals.items():
        assert measured(relative_distance(final, reference, theta0), name) < 1e-5
    assert relative_distance(finals["2x2x8"], finals["1x4x8"], theta0) < 1e-5
    naive = naive_parameters(net_with(initial), x, y, k=4, micro=8)
    assert measured(relative_distance(naive, reference, theta0), "naive 1x4x8") > 1e-3


@pytest.mark.slow
def test_the_user_project_logs_no_key_twice(sweep) -> None:
    """The project logs its own train/loss per epoch; its rescaler config renames the per-step key."""
    assert "logs the same key" not in sweep["stderr"]
