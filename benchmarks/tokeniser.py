"""How a trained VQVAE tokenises the shapes data: codes and bits per token (all patches, plain
patches, plain-white ones) and its ceiling (reconstructions the parser reads exactly) on both splits.

    .venv/bin/python benchmarks/tokeniser.py --vqvae models/default/vqvae [--n 1000]

--vqvae takes a component folder (MODEL/vqvae, or OUT/vqvae of `vqdiff train vqvae`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqdiff.model.shapes.evaluate import tokeniser_stats, vqvae_ceiling
from vqdiff.model.io.folder import load_vqvae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vqvae", type=Path, required=True)
    ap.add_argument("--n", type=int, default=1000, help="images per measurement")
    args = ap.parse_args()
    vqvae = load_vqvae(args.vqvae)
    stats = tokeniser_stats(vqvae, n=args.n)
    stats["ceiling_train"] = vqvae_ceiling(vqvae, n=args.n, split="train")
    stats["ceiling_heldout"] = vqvae_ceiling(vqvae, n=args.n // 2, split="heldout")
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
