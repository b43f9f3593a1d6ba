"""Host memory and time of ``load_model`` on a model folder: peak anonymous memory (``RssAnon``,
sampled every 5 ms; the memory-mapped weight files' pages are not counted) and the peak RSS.

    python benchmarks/bench_load.py /tmp/ithq-random --dtype bf16

(``bench_diffusers.py --ithq-random DIR --write-only`` writes an ITHQ-shaped folder to try it on.)
"""

from __future__ import annotations

import argparse
import resource
import threading
import time

import torch

from vqdiff.model.io.folder import load_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the transformer's")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    peak = [0]

    def watch() -> None:
        while True:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon"):
                        peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()
    t0 = time.perf_counter()
    model = load_model(args.folder, dtype=DTYPES[args.dtype], device=args.device)
    seconds = time.perf_counter() - t0
    time.sleep(0.05)  # one more sample after the load
    kept = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e9
    print(f"{args.folder} {args.dtype} on {args.device}: kept {kept:.2f} GB, peak anonymous {peak[0] / 1e9:.2f} GB, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB, {seconds:.1f} s")


if __name__ == "__main__":
    main()
