"""The paper's inference ablations on the shapes benchmark, as markdown tables.

    .venv/bin/python benchmarks/eval_sweep.py --model models/default [--n 100] [--split heldout]

Rows: the improved sampler (purity prior) at several numbers of forward passes against the
random-order and original (skip-step posterior) samplers at the same forwards (Tables 2-3 of the
paper), and a guidance-scale sweep with 4 samples per prompt for diversity (Fig. 2). Fidelity is
exact (model/evaluate.py). Prints a table per prompt kind.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from model.evaluate import evaluate
from model.folder import load_model
from model.sampler import default_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--split", default="train")
    ap.add_argument("--kinds", default="one,two")
    ap.add_argument("--guidance", type=float, default=3.0)
    args = ap.parse_args()
    model = load_model(args.model)
    base = replace(default_params(model), guidance_scale=args.guidance)
    rows = []
    for steps in (4, 8, 16, 32):
        for sampler in ("purity", "random", "skip"):
            rows.append((f"{sampler}, {steps} forwards", replace(base, sampler=sampler, steps=steps), 1))
    rows.append(("posterior (original), 100 forwards", replace(base, sampler="posterior", steps=100), 1))
    for g in (1.0, 2.0, 3.0, 5.0, 8.0):
        rows.append((f"purity 16, guidance {g:g}, 4 samples", replace(base, sampler="purity", steps=16, guidance_scale=g), 4))
    for kind in args.kinds.split(","):
        print(f"\n### {kind}-object prompts, {args.split} split, {args.n} prompts (model {args.model})\n")
        print("| setting | fidelity | quality | diversity | s |\n| --- | ---: | ---: | ---: | ---: |")
        for name, params, samples in rows:
            t0 = time.time()
            r = evaluate(model, kind, args.split, args.n, samples, params)
            div = f"{r['diversity']:.3f}" if "diversity" in r else "-"
            print(f"| {name} | {r['fidelity']:.3f} | {r['quality']:.3f} | {div} | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
