"""The product's pages speak about the product: no wording about the machine it was built on, code that fits.

A figure keeps its machine as a spec (CPU, cores, memory, software versions), never as "here" or "this
machine". Code blocks fit the docs site's column at 1280 px (100 characters).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from docs_figures import ROOT

# README, changelog and docs pages; the configs, packaging and site settings users read.
PRODUCT = sorted(
    [
        ROOT / "README.md",
        ROOT / "CHANGELOG.md",
        ROOT / "pyproject.toml",
        ROOT / "mkdocs.yml",
        *(ROOT / "docs").rglob("*.md"),
        *(ROOT / "docs" / "examples").rglob("*.py"),
        *(ROOT / "docs" / "examples").rglob("*.yaml"),
        *(ROOT / "conf").rglob("*.yaml"),
        ROOT / "scripts" / "refresh_figures.py",  # writes the figure captions into the pages
    ]
)
MACHINE_WORDING = re.compile(
    r"this (project's )?(machine|host|computer)s?|this project's \d+-core|(not )?(run|measured|tested) here\b"
    r"|on this host|(for|of) a \d+-core machine|(on|of) the CI machines?",
    re.I,
)
WIDTH = 100
FENCE = re.compile(r"^\s*```")


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", PRODUCT, ids=relative)
def test_no_wording_about_the_machine_it_was_built_on(path: Path) -> None:
    found = [
        f"{relative(path)}:{number}: {line.strip()}"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if MACHINE_WORDING.search(line)
    ]
    assert not found, "name the machine as a spec (CPU, cores, versions), not as 'here':\n" + "\n".join(found)


def code_lines(text: str) -> list[tuple[int, str]]:
    r"""``(line number, line)`` of every line of code in a Markdown page's fenced blocks.

    Not ```text blocks: a program's output shown verbatim (a sweep's table) or a diagram, which scroll.

    Example:
        >>> code_lines("a\n```py\nx = 1\n```\n```text\nout\n```")
        [(3, 'x = 1')]
    """
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fence = line.strip()[3:] if fence is None else None
        elif fence is not None and fence != "text":
            lines.append((number, line))
    return lines


def test_the_wording_check_finds_machine_phrases() -> None:
    phrases = ["on this machine", "measured on this project's 2-core CPU machine", "not run here", "on this host"]
    assert all(MACHINE_WORDING.search(phrase) for phrase in phrases)
    assert not MACHINE_WORDING.search("measured on a 2-core AMD EPYC (torch 2.13.0): where it runs")


@pytest.mark.parametrize("path", [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))], ids=relative)
def test_code_blocks_fit_the_page(path: Path) -> None:
    """Included examples are checked as shown (the include markers hold them verbatim)."""
    text = path.read_text()
    wide = [f"{relative(path)}:{n}: {len(line)} characters" for n, line in code_lines(text) if len(line) > WIDTH]
    assert not wide, f"code lines over {WIDTH} characters are cut off on the docs site:\n" + "\n".join(wide)
