"""Figures quoted in the README and docs: their JSON sources, tolerance bands and generated blocks.

Every number the docs quote about this package sits between ``<!-- figures:NAME -->`` and
``<!-- /figures:NAME -->`` markers and is rendered from a JSON file under ``docs/figures/`` by
``python scripts/refresh_figures.py``, which also regenerates the JSON (see its ``--help``). Code examples are
included the same way between ``<!-- include:PATH -->`` and ``<!-- /include -->`` from the file at PATH.

Examples:
    >>> within_band(quoted=0.49, fresh=0.4903), within_band(quoted=0.49, fresh=0.52)
    (True, False)
    >>> within_band(quoted=2.7e-7, fresh=1.9e-7), within_band(quoted=2.7e-7, fresh=3e-5)
    (True, False)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
MEASURED_FILE = FIGURES / "measured.json"
REFRESH_COMMAND = "python scripts/refresh_figures.py"
BLOCK = re.compile(r"(<!-- figures:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /figures:(?P=name) -->)", re.S)
INCLUDE = re.compile(r"(<!-- include:(?P<path>[\w./-]+) -->\n)(?P<body>.*?)(<!-- /include -->)", re.S)


def within_band(quoted: float, fresh: float) -> bool:
    """Whether a fresh measurement still matches the quoted figure.

    Figures under 0.1 (exact distances and low-precision errors: float rounding) move with the platform's
    rounding, so they match within a factor of 2; larger ones (naive distances, metrics) are deterministic up
    to that rounding and match within 2 %.
    """
    if quoted == fresh:
        return True
    if abs(quoted) < 0.1:
        if quoted <= 0 or fresh <= 0:
            return max(abs(quoted), abs(fresh)) < 1e-6
        return abs(math.log10(fresh / quoted)) <= math.log10(2)
    return abs(fresh - quoted) <= 0.02 * abs(quoted)


def load(name: str) -> Any:
    """The JSON figure file ``docs/figures/<name>.json`` (``{}`` when absent)."""
    path = FIGURES / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save(name: str, data: Any) -> None:
    """Write ``docs/figures/<name>.json``, keys sorted, so that diffs stay small."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    (FIGURES / f"{name}.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def documents() -> list[Path]:
    """The README and every Markdown page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def render_text(text: str, renderers: dict[str, Callable[[], str]]) -> str:
    """``text`` with every figures block re-rendered and every include block re-read from its file."""

    def figures(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in renderers:
            raise KeyError(f"no renderer for the figures block {name!r}; known: {sorted(renderers)}")
        return match[1] + renderers[name]().rstrip("\n") + "\n" + match[4]

    def include(match: re.Match[str]) -> str:
        path = ROOT / match["path"]
        fence = "yaml" if path.suffix in (".yaml", ".yml") else "python"
        return f"{match[1]}```{fence}\n{path.read_text().rstrip()}\n```\n{match[4]}"

    return INCLUDE.sub(include, BLOCK.sub(figures, text))
