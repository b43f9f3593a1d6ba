"""Where the models that ship with the package live: the embedded default model and the
feature net of the shapes benchmark, and how to point elsewhere.

``models/`` sits beside ``model/`` in the repository and beside ``vqdiff/model/`` in an installed
package (pyproject.toml maps it to ``vqdiff.models`` as package data), so one path works in both.
The default model is a small model trained by this project on the shapes dataset
(``models/default/README.md``); ``VQDIFF_MODEL`` overrides it (a model folder path), and every
command's ``--model`` overrides both.
"""

from __future__ import annotations

import os
from pathlib import Path

MODELS = Path(__file__).resolve().parents[2] / "models"  # model/io/default.py -> models/
EMBEDDED = MODELS / "default"
FEATURES = MODELS / "features"  # the shapes benchmark's feature net (`vqdiff train features`)
ENV = "VQDIFF_MODEL"


def default_model_dir() -> Path:
    path = Path(os.environ[ENV]) if os.environ.get(ENV) else EMBEDDED
    if not (path / "model_index.json").is_file():
        source = f"${ENV}" if os.environ.get(ENV) else "the embedded default model"
        raise FileNotFoundError(f"{path}: {source} is not a model folder; pass --model DIR")
    return path
