"""Keep this checkout's top-level folders from shadowing installed distributions of the same name.

The source folders ``model/``, ``server/``, ``kernels/`` and ``models/`` install as ``vqdiff.model``,
``vqdiff.server``, ``vqdiff.kernels`` and ``vqdiff.models`` (pyproject.toml), and nothing here imports them
under their bare names. But wherever the checkout root itself is on ``sys.path`` (pytest's rootdir insertion,
``python -m ...`` or a REPL started in the root, whose '' entry is the current directory) they are also
importable as top-level ``model``, ``server``, ``kernels``: a regular package found on an earlier path entry
wins over the installed distribution, so ``import kernels`` inside transformers (which imports the
``kernels`` distribution from 5.25 on) would load this checkout's Triton folder and fail.

``install()`` puts a finder first on ``sys.meta_path`` that resolves those bare names against ``sys.path``
without the checkout root. When an installed distribution provides the name, it is the one imported; when none
does, the finder steps aside and the import resolves as it did before. It does nothing in an installed wheel,
where the package's parent folder is site-packages, not a checkout.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from pathlib import Path

# The bare names a checkout root on sys.path exposes: its top-level folders with Python files.
SHADOWING = frozenset({"model", "server", "kernels", "models"})


def checkout_root() -> Path | None:
    """The source checkout this package runs from, or None when it runs from an installed wheel."""
    root = Path(__file__).resolve().parent.parent
    # kernels/guided.py, not kernels/__init__.py: site-packages may hold the other `kernels` package
    if (root / "pyproject.toml").is_file() and (root / "kernels" / "guided.py").is_file():
        return root
    return None


class InstalledFirst(importlib.abc.MetaPathFinder):
    """Resolve SHADOWING's top-level names on sys.path less the checkout root."""

    def __init__(self, root: Path):
        self.root = root

    def _is_root(self, entry: str) -> bool:
        try:
            return Path(entry or os.curdir).resolve() == self.root
        except (OSError, ValueError):   # an entry that is not a path (a zip's name, a deleted directory)
            return False

    def find_spec(self, fullname, path=None, target=None):
        if path is not None or fullname not in SHADOWING:
            return None                 # a submodule, or a name no folder here exposes
        entries = [e for e in sys.path if isinstance(e, str) and not self._is_root(e)]
        return importlib.machinery.PathFinder.find_spec(fullname, entries)   # None: the usual finders decide


def install() -> None:
    """Put InstalledFirst first on sys.meta_path, once, when running from a checkout."""
    root = checkout_root()
    if root is None or any(isinstance(f, InstalledFirst) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, InstalledFirst(root))
