"""The bundled reference model and the text it was trained and evaluated on.

edgeq ships a small Llama-architecture causal LM (``edgeq-tiny-stdlib``) that the project trains
itself (``python -m edgeq.bundled.train``) on the source files of Python's standard library, text
that every Python install carries. A fixed, hash-selected tenth of those files is held out; the
held-out files are the evaluation text for perplexity everywhere in the project.

This module is torch-free: the device side may use it to build evaluation text.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from pathlib import Path

MODEL_NAME = "edgeq-tiny-stdlib"
MODEL_DIR = Path(__file__).resolve().parent / MODEL_NAME
#: Separator placed between files; it is the tokenizer's only special token.
DOC_SEPARATOR = "<|endoftext|>"
#: One file in ``HOLDOUT_MODULUS`` (chosen by a hash of its relative path) is held out.
HOLDOUT_MODULUS = 10
_SKIP_PARTS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """All ``.py`` files of the running interpreter's stdlib, sorted, test suites excluded."""
    root = stdlib_root()
    files = [p for p in root.rglob("*.py") if not (_SKIP_PARTS & set(p.relative_to(root).parts))]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_heldout(path: Path) -> bool:
    rel = path.relative_to(stdlib_root()).as_posix()
    return int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) % HOLDOUT_MODULUS == 0


def split_files() -> tuple[list[Path], list[Path]]:
    """(train, heldout) file lists; deterministic for a given Python version."""
    files = stdlib_files()
    return [p for p in files if not is_heldout(p)], [p for p in files if is_heldout(p)]


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def heldout_text(max_chars: int | None = None) -> str:
    """The held-out stdlib files joined in sorted order, optionally cut at ``max_chars``."""
    parts: list[str] = []
    total = 0
    for path in split_files()[1]:
        text = read_text(path)
        parts.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    joined = "\n\n".join(parts)
    return joined if max_chars is None else joined[:max_chars]


def python_tag() -> str:
    return f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}"
