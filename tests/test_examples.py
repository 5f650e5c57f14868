"""The docs' examples run as written, and the pages show them (and the generated figures) verbatim.

``docs/examples/*.py`` are the Quick starts that the README and docs/getting-started.md include; every
```python block of the docs pages runs too (```py marks a fragment that is shown, not run).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from docs_figures import INCLUDE, REFRESH_COMMAND, ROOT
from refresh_figures import rewrite

EXAMPLES = ROOT / "docs" / "examples"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in ``cwd`` with the checkout importable; fail the test with its output if it fails."""
    done = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def test_pages_show_the_examples_and_figures_verbatim() -> None:
    stale = rewrite(check=True)
    assert not stale, f"out of date: {[str(p.relative_to(ROOT)) for p in stale]}; run {REFRESH_COMMAND}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart_classifier", "quickstart_lm"])
def test_quickstart_runs_as_written(name: str, tmp_path: Path) -> None:
    """Each quick start asserts what its comments claim (the last step's items) and leaves the folder empty."""
    done = run([sys.executable, str(EXAMPLES / f"{name}.py")], cwd=tmp_path)
    assert "'train/loss'" in done.stdout and "'train/items'" in done.stdout, done.stdout
    if name == "quickstart_classifier":
        assert "'train/items': 36.0" in done.stdout, done.stdout  # 100 samples: 64, then 16 + 16 + 4
    assert list(tmp_path.iterdir()) == [], "the quick start wrote to the working folder"


@pytest.mark.slow
def test_ddp_example_trains_each_sample_once(tmp_path: Path) -> None:
    done = run([sys.executable, str(EXAMPLES / "ddp_classifier.py")], cwd=tmp_path)
    # 97 samples, 2 x 2 x 8 per step: 1 in the last, where rank 1's padding micro-batch (a real sample) counts nothing
    assert "'train/items': 1.0" in done.stdout, done.stdout


@pytest.mark.slow
def test_lightning_cli_config_adds_the_callback(tmp_path: Path) -> None:
    cli = EXAMPLES / "lightning_cli"
    command = [
        sys.executable,
        str(cli / "cli.py"),
        "fit",
        "--config",
        str(cli / "config.yaml"),
        "--trainer.max_steps=2",
        "--print_config",
    ]
    printed = run(command, cwd=tmp_path).stdout
    assert "class_path: lightning_accum.SampleCountRescaler" in printed
    done = run(command[:-1], cwd=tmp_path)
    assert "`max_steps=2` reached" in done.stdout + done.stderr


def doc_pages() -> list[Path]:
    """The docs pages with ```python blocks of their own (included example files run above)."""
    pages = sorted((ROOT / "docs").rglob("*.md"))
    return [page for page in pages if PYTHON_BLOCK.search(INCLUDE.sub("", page.read_text()))]


@pytest.mark.slow
@pytest.mark.parametrize("page", doc_pages(), ids=lambda page: str(page.relative_to(ROOT)))
def test_docs_code_blocks_run(page: Path, tmp_path: Path) -> None:
    blocks = PYTHON_BLOCK.findall(INCLUDE.sub("", page.read_text()))
    script = tmp_path / "page.py"
    script.write_text("\n\n".join(blocks))
    run([sys.executable, str(script)], cwd=tmp_path)


def test_readme_links_resolve() -> None:
    """Every relative link and image of the README names a file of the checkout (mkdocs checks the docs)."""
    readme = (ROOT / "README.md").read_text()
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)", readme) if "://" not in t]
    assert targets, "no links found"
    broken = [t for t in targets if not (ROOT / t).exists()]
    assert not broken, f"README links to missing files: {broken}"


@pytest.mark.slow
def test_noise_scale_example_logs_the_noise_scale(tmp_path: Path) -> None:
    done = run([sys.executable, str(EXAMPLES / "noise_scale.py")], cwd=tmp_path)
    for key in ("'train/noise_scale'", "'train/noise_scale_grad_squared'", "'train/noise_scale_trace'"):
        assert key in done.stdout, done.stdout
    assert "B_simple = " in done.stdout and "nan" not in done.stdout, done.stdout
