"""A feature network for the shapes benchmark, and the Fréchet distance in its feature space.

Inception cannot be downloaded here, so FID's role is played by a small CNN trained by this project
(``vqdiff train features``) to recognise what is in a shapes image: which colour/shape pairs, which
sizes, how many objects, which halves of the image are occupied. Its penultimate layer (``DIM``
features) is the space in which generated and real images are compared.

The Fréchet distance between Gaussians fitted to two feature sets is
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2),
computed in float64 with symmetric eigendecompositions (no scipy).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from vqdiff.model.shapes import scenes as shapes

DIM = 64
LABELS = (
    [f"{c} {s}" for c in shapes.COLOURS for s in shapes.SHAPES]  # 18: colour/shape pairs present
    + [f"{z} {s}" for z in shapes.SIZES for s in shapes.SHAPES]  # 6: size/shape pairs present
    + ["1 object", "2 objects", "3 objects"]
    + ["left half", "right half", "top half", "bottom half"]  # an object's centre lies there
)


class FeatureNet(nn.Module):
    def __init__(self, dim: int = DIM, num_labels: int = len(LABELS)):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1, stride=2), nn.GroupNorm(8, cout), nn.SiLU())

        # 32 px -> 4 px; other sizes are pooled to 4 x 4 (the test model draws 16 px)
        self.body = nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(4))
        self.proj = nn.Linear(128 * 4 * 4, dim)
        self.head = nn.Linear(dim, num_labels)

    def features(self, x: Tensor) -> Tensor:
        """(B, 3, 32, 32) in [0, 1] -> (B, dim)."""
        return torch.tanh(self.proj(self.body(x * 2 - 1).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (B, num_labels) logits


def labels(scene: shapes.Scene) -> np.ndarray:
    y = np.zeros(len(LABELS), np.float32)
    half = scene.image_size / 2
    for o in scene.objects:
        y[LABELS.index(f"{o.colour} {o.shape}")] = 1
        y[LABELS.index(f"{o.size} {o.shape}")] = 1
        y[LABELS.index("left half" if o.cx < half else "right half")] = 1
        y[LABELS.index("top half" if o.cy < half else "bottom half")] = 1
    y[LABELS.index(f"{len(scene.objects)} object{'s' if len(scene.objects) > 1 else ''}")] = 1
    return y


def batch(indices, seed: int, split: str = "train") -> tuple[Tensor, Tensor]:
    items = [shapes.generate(int(i), seed=seed, split=split) for i in indices]
    x = torch.from_numpy(np.stack([it[0] for it in items])).permute(0, 3, 1, 2).float() / 255  # (B, 3, 32, 32)
    y = torch.from_numpy(np.stack([labels(it[3]) for it in items]))  # (B, L)
    return x, y


def train_features(out: str | Path, steps: int = 2500, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                   progress: bool = True) -> Path:
    """Train on freshly generated images (the dataset seed differs from the generator's training set,
    seed 0), evaluate on the held-out split, save OUT/model.safetensors + OUT/config.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = FeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    data_seed = 1000 + seed
    t0 = time.time()
    for step in tqdm(range(steps), desc="train features", disable=not progress):
        x, y = batch(range(step * batch_size, (step + 1) * batch_size), data_seed)
        loss = nn.functional.binary_cross_entropy_with_logits(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    accuracy = {split: label_accuracy(net, split) for split in ("train", "heldout")}
    save_file(net.state_dict(), out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({
        "dim": DIM, "labels": LABELS, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
        "data": f"model/shapes/scenes.py generate(i, seed={data_seed}), i < {steps * batch_size}",
        "exact_label_accuracy": accuracy, "train_seconds": round(time.time() - t0),
    }, indent=2) + "\n")
    return out


@torch.no_grad()
def label_accuracy(net: FeatureNet, split: str, n: int = 1000) -> float:
    """Share of images (a fresh seed) whose every label is predicted right. On the held-out split the
    held-out colour/shape pairs are left out: they were never a positive label in training."""
    x, y = batch(range(n), seed=54321, split=split)
    keep = torch.ones(len(LABELS), dtype=torch.bool)
    if split == "heldout":
        for colour, shape in shapes.HELDOUT:
            keep[LABELS.index(f"{colour} {shape}")] = False
    return float(((net(x) > 0).float() == y)[:, keep].all(dim=1).float().mean())


def load_features(folder: str | Path) -> FeatureNet:
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    net = FeatureNet(config["dim"], len(config["labels"]))
    net.load_state_dict(load_file(folder / "model.safetensors"))
    return net.eval()


@torch.no_grad()
def embed(net: FeatureNet, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(M, 32, 32, 3) uint8 -> (M, dim) float64."""
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2).float() / 255
        out.append(net.features(x).double())
    return torch.cat(out).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD between Gaussians fitted to feature sets a (M, D) and b (M', D)."""
    a, b = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)  # (D, D)
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T  # S_a^1/2
    middle = root_a @ s_b @ root_a
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * tr_sqrt)
