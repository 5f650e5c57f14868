"""Real text available offline: the docstrings of standard-library modules, as character-level sequences."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
from torch import Tensor

STDLIB_MODULES = (
    "argparse", "bisect", "collections", "contextlib", "csv", "dataclasses", "decimal", "difflib", "doctest",
    "enum", "fractions", "functools", "heapq", "inspect", "itertools", "json", "logging", "os", "pathlib",
    "pickle", "random", "re", "shutil", "statistics", "string", "tempfile", "textwrap", "typing", "unittest",
)  # fmt: skip

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


def stdlib_docstring_lines(modules: Sequence[str] = STDLIB_MODULES, min_chars: int = 16) -> list[str]:
    """Return the stripped lines of at least ``min_chars`` characters from the modules' docstrings.

    Examples:
        >>> lines = stdlib_docstring_lines(["json"])
        >>> lines[0].startswith("JSON")
        True
    """
    lines = []
    for name in modules:
        doc = importlib.import_module(name).__doc__ or ""
        lines.extend(line.strip() for line in doc.splitlines() if len(line.strip()) >= min_chars)
    return lines


class CharVocab:
    """Character vocabulary with ``<pad>`` (id 0), ``<bos>`` and ``<eos>``.

    Examples:
        >>> vocab = CharVocab(["ab", "ba!"])
        >>> len(vocab), vocab.pad_id
        (6, 0)
        >>> vocab.encode("ab!", max_chars=2)
        tensor([1, 4, 5, 2])
    """

    def __init__(self, texts: Sequence[str]) -> None:
        self.itos = [PAD, BOS, EOS, *sorted(set("".join(texts)))]
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, max_chars: int) -> Tensor:
        """``<bos>`` + the first ``max_chars`` characters + ``<eos>`` as a ``LongTensor``."""
        ids = [self.bos_id, *(self.stoi[c] for c in text[:max_chars]), self.eos_id]
        return torch.tensor(ids, dtype=torch.long)
