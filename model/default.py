"""Where the embedded default model lives, and how to point elsewhere.

The repository ships a small model trained here on the shapes dataset (``models/default``, issue 4);
``VQDIFF_MODEL`` overrides it (a model folder path), and every command's ``--model`` overrides both.
"""

from __future__ import annotations

import os
from pathlib import Path

EMBEDDED = Path(__file__).resolve().parent.parent / "models" / "default"
ENV = "VQDIFF_MODEL"


def default_model_dir() -> Path:
    path = Path(os.environ[ENV]) if os.environ.get(ENV) else EMBEDDED
    if not (path / "model_index.json").is_file():
        source = f"${ENV}" if os.environ.get(ENV) else "the embedded default model"
        raise FileNotFoundError(f"{path}: {source} is not a model folder; pass --model DIR")
    return path
