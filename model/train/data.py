"""Image-caption folders: the training data layout every ``vqdiff train`` command reads.

    DIR/captions.jsonl    one JSON object per line: {"image": "relative/path.png", "caption": "..."}

or, without captions.jsonl, image files with a caption sidecar of the same name:

    DIR/0001.png  DIR/0001.txt   (any depth; .png .jpg .jpeg .webp)

Images are converted to RGB, centre-cropped to a square and resized to the model's image size.
Problems (a missing image, an empty caption, a bad line) fail loudly, naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def read_index(folder: Path) -> list[tuple[Path, str]]:
    """(image path, caption) pairs of a folder, in a stable order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: data folder not found")
    index = folder / "captions.jsonl"
    pairs: list[tuple[Path, str]] = []
    if index.is_file():
        for n, line in enumerate(index.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image, caption = folder / row["image"], row["caption"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}:{n}: expected {{\"image\": ..., \"caption\": ...}} ({e})") from None
            pairs.append((image, caption))
    else:
        for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
            side = image.with_suffix(".txt")
            if not side.is_file():
                raise FileNotFoundError(f"{image}: no caption file {side.name} (and no captions.jsonl in {folder})")
            pairs.append((image, side.read_text().strip()))
    if not pairs:
        raise ValueError(f"{folder}: no images found (expected captions.jsonl, or images with .txt captions)")
    for image, caption in pairs:
        if not image.is_file():
            raise FileNotFoundError(f"{image}: listed in {folder} but not found")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{image}: empty caption")
    return pairs


def load_image(path: Path, size: int) -> Tensor:
    """RGB, centre-cropped square, resized: (3, size, size) float in [0, 1]."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if s != size:
            im = im.resize((size, size), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, H, W)


class ImageCaptionFolder(Dataset):
    """(image (3, S, S) in [0, 1], caption) pairs; all images are decoded once and kept in memory
    when ``cache`` (small datasets train on a CPU many epochs over)."""

    def __init__(self, folder: str | Path, image_size: int, cache: bool = True):
        self.pairs = read_index(Path(folder))
        self.image_size = image_size
        self._cache: dict[int, Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[Tensor, str]:
        path, caption = self.pairs[i]
        if self._cache is None:
            return load_image(path, self.image_size), caption
        if i not in self._cache:
            self._cache[i] = load_image(path, self.image_size)
        return self._cache[i], caption


def write_folder(folder: str | Path, items, append: bool = False) -> Path:
    """Write (uint8 (H, W, 3) image, caption) pairs as a captions.jsonl folder.

    ``append`` adds them after the pairs already there (numbering continues), so one folder can
    hold several sources in a known order; otherwise the folder must not hold a captions.jsonl."""
    folder = Path(folder)
    index = folder / "captions.jsonl"
    start = 0
    if index.is_file():
        if not append:
            raise FileExistsError(f"{index} exists; pass append=True to add to it, or choose a new folder")
        start = sum(1 for line in index.read_text().splitlines() if line.strip())
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with open(index, "a") as f:
        for i, (image, caption) in enumerate(items, start):
            name = f"images/{i:06d}.png"
            if (folder / name).exists():
                raise FileExistsError(f"{folder / name} exists but is not listed in {index}")
            Image.fromarray(image).save(folder / name)
            f.write(json.dumps({"image": name, "caption": caption}) + "\n")
    return folder
