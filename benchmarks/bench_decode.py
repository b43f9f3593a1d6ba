"""VQVAE decoding in fixed-size batches: time per image, and how many images' PNG bytes differ
from the same grid decoded alone.

    .venv/bin/python benchmarks/bench_decode.py [--model DIR] [--images 64] [--batches 1,4,16] [--dtype fp32]

The server decodes the grids finished in a step in calls of exactly ``decode_batch`` rows
(model/io/images.py). A convolution's kernel, and so the last bits of its output, may depend on the
batch size: this prints what a batch size costs in exactness on this machine, and what it buys in
speed. Random token grids stand in for generated ones (the decoder sees the same shapes).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from vqdiff.model.io.default import default_model_dir
from vqdiff.model.io.folder import load_model
from vqdiff.model.io.images import decode_pngs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder; default: the embedded model")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    model = load_model(args.model or default_model_dir(), device=args.device, dtype=DTYPES[args.dtype])
    c = model.config.transformer
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, c.num_embed, (args.images, c.num_tokens), generator=g).to(model.device)  # (M, N)
    print(f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {args.dtype} | "
          f"{args.images} grids of {c.height}x{c.width} tokens")
    alone = None
    for batch in (int(b) for b in args.batches.split(",")):
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            pngs = decode_pngs(model, tokens, batch=batch)
            times.append(time.perf_counter() - t0)
        if alone is None:
            alone = pngs
        differ = sum(a != b for a, b in zip(alone, pngs))
        print(f"decode_batch {batch:3d}: {1000 * statistics.median(times) / args.images:7.2f} ms/image | "
              f"{differ}/{args.images} images' bytes differ from batch {args.batches.split(',')[0]}")


if __name__ == "__main__":
    main()
