"""Other versions of the package, importable side by side in one process.

Part 1 compares the package of an earlier commit with the working tree's in the same run,
interleaved, so machine drift cancels out. Each version is copied under its own top-level
name (``koala_first``, ``koala_after``...): the package imports itself only relatively, so a
renamed copy is a full, independent package (its own contextvars, caches, client registry).
Copies live in a temporary directory added to ``sys.path``; nothing is written to the tree.
"""

from __future__ import annotations

import importlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "koala_middleware"
_HOME = Path(tempfile.mkdtemp(prefix="koala-bench-versions-"))


def load(label: str, commit: str | None = None) -> ModuleType:
    """The package as of ``commit`` (None: the working tree, uncommitted edits included),
    imported as ``koala_<label>``."""
    name = f"koala_{label}"
    target = _HOME / name
    if not target.exists():
        if commit is None:
            shutil.copytree(ROOT / PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", "--format=tar", commit, PACKAGE],
                check=True,
                capture_output=True,
            ).stdout
            scratch = _HOME / f".{label}"
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                tar.extractall(scratch, filter="data")
            (scratch / PACKAGE).rename(target)
            scratch.rmdir()
    if str(_HOME) not in sys.path:
        sys.path.insert(0, str(_HOME))
    return importlib.import_module(name)


def submodule(package: ModuleType, name: str) -> ModuleType | None:
    """``package.name`` (``asgi``, ``wsgi``, ``django``), or None where that version has none."""
    try:
        return importlib.import_module(f"{package.__name__}.{name}")
    except ModuleNotFoundError:
        return None
