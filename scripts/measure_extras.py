"""Measure what each install extra brings: packages and disk of a fresh virtual environment per extra.

For each of ``core`` (no extra), ``app``, ``cli``, ``fast``, ``dev`` and ``docs`` it creates a new venv in a temporary
folder, runs ``pip install torch==2.13.0 ".[extra]"`` (a regular, non-editable install of this checkout) and
records the number of installed distributions (``pip list``, pip itself included) and the venv's size on disk
(the sum of its files' sizes). It writes ``docs/figures/extras.json``; ``python scripts/refresh_figures.py``
puts the table into the README and docs/install.md. Footprints depend on the torch wheel (CPU here) and on
the Python version, both recorded.

    python scripts/measure_extras.py                 # all extras, a few minutes
    python scripts/measure_extras.py --extras core app  # only these rows; the others are kept
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "figures" / "extras.json"
EXTRAS = ["core", "app", "cli", "fast", "dev", "docs"]
TORCH_PIN = "torch==2.13.0"


def folder_bytes(path: Path) -> int:
    """The sum of the sizes of the regular files under ``path`` (links not followed)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            file = Path(folder) / name
            if not file.is_symlink():
                total += file.stat().st_size
    return total


def measure(extra: str, python: str) -> dict[str, object]:
    """Install ``extra`` into a fresh venv and return its package count and size."""
    target = "." if extra == "core" else f".[{extra}]"
    with tempfile.TemporaryDirectory(prefix=f"extra-{extra}-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip"]
        subprocess.run([*pip, "install", "--quiet", TORCH_PIN, target], check=True, cwd=ROOT)
        listing = json.loads(
            subprocess.run([*pip, "list", "--format=json"], check=True, capture_output=True, text=True).stdout
        )
        versions = {d["name"].lower(): d["version"] for d in listing}
        return {
            "extra": extra,
            "packages": len(listing),
            "disk_mb": round(folder_bytes(venv) / 2**20),
            "torch": versions.get("torch", "?"),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", nargs="+", default=EXTRAS, choices=EXTRAS)
    parser.add_argument("--python", default="python3", help="interpreter that creates the venvs")
    args = parser.parse_args()
    version = subprocess.run(
        [args.python, "-c", "import platform; print(platform.python_version())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    rows = []
    for extra in args.extras:
        row = measure(extra, args.python)
        print(json.dumps(row), flush=True)
        rows.append(row)
    # Extras not measured this time keep their rows (same Python and machine only), in EXTRAS order.
    kept = json.loads(OUTPUT.read_text()) if OUTPUT.exists() else {}
    if (kept.get("python"), kept.get("machine")) == (version, platform.machine()):
        rows += [row for row in kept["rows"] if row["extra"] not in args.extras and row["extra"] in EXTRAS]
    rows.sort(key=lambda row: EXTRAS.index(row["extra"]))
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps({"python": version, "machine": platform.machine(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {OUTPUT.relative_to(ROOT)}; now run python scripts/refresh_figures.py", file=sys.stderr)


if __name__ == "__main__":
    main()
