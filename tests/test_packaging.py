"""The wheel holds the library and its Hydra-free demos; importing every module it installs needs no extra."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path
from unittest import mock

import pytest

import lightning_accum

ROOT = Path(__file__).resolve().parents[1]
# Packages of the app, fast, dev and docs extras; `pip install lightning-accum` brings none of them.
EXTRAS_ONLY = (
    "hydra",
    "omegaconf",
    "hydra_plugins",
    "optuna",
    "submitit",
    "sklearn",
    "matplotlib",
    "tensorboard",
    "numba",
    "llvmlite",
)

IMPORT_ALL = """
import importlib, sys, zipfile
import lightning.pytorch, torch, torchmetrics  # what the core dependencies import by themselves
before = set(sys.modules)
sys.path.insert(0, sys.argv[1])  # the wheel itself, zip-imported
names = [n[:-3].replace("/", ".").removesuffix(".__init__") for n in zipfile.ZipFile(sys.argv[1]).namelist()
         if n.endswith(".py")]
for name in names:
    module = importlib.import_module(name)
    assert module.__file__.startswith(sys.argv[1]), module.__file__
added = {name.split(".")[0] for name in set(sys.modules) - before}
print(len(names), " ".join(sorted(added & set(sys.argv[2].split(",")))))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout's wheel, built once for the module."""
    folder = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(folder)]
    subprocess.run([*build, str(ROOT)], check=True, capture_output=True, timeout=300)
    (built,) = folder.glob("lightning_accum-*.whl")
    return built


@pytest.mark.slow
def test_wheel_holds_the_library_and_demos_and_imports_without_extras(wheel: Path) -> None:
    files = [name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")]
    assert {"lightning_accum/callback.py", "lightning_accum/demos/models.py"} <= set(files)
    assert "lightning_accum/py.typed" in zipfile.ZipFile(wheel).namelist()  # type checkers read the hints
    assert all(name.startswith("lightning_accum/") for name in files), files  # no app, no tests, no scripts
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, str(wheel), ",".join(EXTRAS_ONLY)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported, *extras = proc.stdout.split()
    assert int(imported) == len(files)
    assert extras == [], f"importing the package pulls in extras: {extras}"


ZIPPED_PASSES = """
import sys
sys.path.insert(0, sys.argv[1])  # the wheel itself, zip-imported: Numba has no folder to cache the kernels in
from lightning_accum.data import compiled_passes
from lightning_accum.data.grouping import length_groups
assert compiled_passes.available() and compiled_passes.__file__.startswith(sys.argv[1])
print(length_groups([5, 1, 5, 2, 9, 1, 3, 3], num_groups=4, max_tokens=12))  # needs the price search
"""


@pytest.mark.slow
def test_compiled_passes_run_from_a_zipped_wheel(wheel: Path) -> None:
    """Numba cannot cache the kernels of a zip-imported module; they compile in the process instead of failing."""
    pytest.importorskip("numba")
    proc = subprocess.run(
        [sys.executable, "-c", ZIPPED_PASSES, str(wheel)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # padded: 3 * 2 + 3 * 3 + 2 * 5 ... the grouping of a Python-only run of the same window, computed here
    from lightning_accum.data import grouping

    with mock.patch.object(grouping, "compiled", lambda: False):
        expected = grouping.length_groups([5, 1, 5, 2, 9, 1, 3, 3], num_groups=4, max_tokens=12)
    assert proc.stdout.split("\n")[0] == str(expected)


def test_the_version_has_one_source() -> None:
    """``pyproject.toml`` reads ``lightning_accum.__version__``; the installed metadata and CHANGELOG.md agree."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"], project
    assert importlib.metadata.version("lightning-accum") == lightning_accum.__version__
    assert f"## {lightning_accum.__version__}" in (ROOT / "CHANGELOG.md").read_text()
