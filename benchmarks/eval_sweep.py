"""The paper's inference ablations on the shapes benchmark, as markdown tables and a plot.

    .venv/bin/python benchmarks/eval_sweep.py --model models/default [--n 100] [--split heldout] \
        [--kinds one,two] [--out docs/results]

Rows: the improved sampler (purity prior) at several numbers of forward passes against the
random-order sampler (Algorithm 1: the purity prior off) and the original skip-step posterior
sampler at the same forwards (Tables 2-3 of the paper), the purity prior's sharpening alone
(purity_weight 0), the full 100-step posterior sampler, and a guidance-scale sweep with 4 samples
per prompt for diversity (Fig. 2). Fidelity is exact (model/shapes/evaluate.py); FD is the Fréchet
distance in the feature space of models/features (model/shapes/features.py). With --out, also writes
results.json and sweep.png (fidelity against forwards; the guidance trade-off).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from vqdiff.model.shapes.evaluate import evaluate
from vqdiff.model.shapes.features import load_features
from vqdiff.model.io.default import FEATURES
from vqdiff.model.io.folder import load_model
from vqdiff.model.sampling.sampler import default_params

STEPS = (4, 8, 16, 32, 64)
GUIDANCE = (1.0, 2.0, 3.0, 5.0, 8.0)


def rows(base) -> list[tuple[str, dict, object, int]]:
    out = []
    for steps in STEPS:
        for sampler in ("purity", "random", "skip"):
            out.append((f"{sampler}, {steps} forwards", {"group": "steps", "sampler": sampler, "forwards": steps},
                        replace(base, sampler=sampler, steps=steps), 1))
    out.append(("purity without sharpening (r = 0), 16 forwards", {"group": "ablation"},
                replace(base, sampler="purity", steps=16, purity_weight=0.0), 1))
    out.append(("posterior (original), 100 forwards", {"group": "steps", "sampler": "posterior", "forwards": 100},
                replace(base, sampler="posterior", steps=100), 1))
    for g in GUIDANCE:
        out.append((f"purity 16, guidance {g:g}, 4 samples", {"group": "guidance", "guidance": g},
                    replace(base, sampler="purity", steps=16, guidance_scale=g), 4))
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["kind"] for r in results})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for kind, style in zip(kinds, ("-", "--", ":")):
        for sampler, colour in (("purity", "C0"), ("random", "C1"), ("skip", "C2")):
            pts = sorted((r["forwards"], r["fidelity"]) for r in results
                         if r["kind"] == kind and r.get("sampler") == sampler and r["group"] == "steps")
            if pts:
                axes[0].plot(*zip(*pts), style, marker="o", color=colour, label=f"{sampler} ({kind}-object)")
        post = [r for r in results if r["kind"] == kind and r.get("sampler") == "posterior"]
        if post:
            axes[0].scatter([100], [post[0]["fidelity"]], color="C3", marker="x", label=f"posterior 100 ({kind}-object)")
        g = sorted((r["guidance"], r["fidelity"], r["quality"], r.get("diversity", 0)) for r in results
                   if r["kind"] == kind and r["group"] == "guidance")
        if g:
            xs = [x[0] for x in g]
            axes[1].plot(xs, [x[1] for x in g], style, marker="o", color="C0", label=f"fidelity ({kind})")
            axes[1].plot(xs, [x[2] for x in g], style, marker="s", color="C2", label=f"quality ({kind})")
            axes[1].plot(xs, [x[3] for x in g], style, marker="^", color="C1", label=f"diversity ({kind})")
    axes[0].set(xscale="log", xlabel="transformer forward passes", ylabel="prompt fidelity",
                title="samplers at equal forwards (Tables 2-3)")
    axes[1].set(xlabel="guidance scale", title="guidance sweep, 4 samples per prompt (Fig. 2)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--split", default="train")
    ap.add_argument("--kinds", default="one,two")
    ap.add_argument("--guidance", type=float, help="guidance for the sampler rows (default: the model's)")
    ap.add_argument("--only", default="steps,ablation,guidance", help="row groups to run")
    ap.add_argument("--features", type=Path, default=FEATURES if (FEATURES / "config.json").is_file() else None)
    ap.add_argument("--out", type=Path, help="folder for results.json and sweep.png")
    args = ap.parse_args()
    model = load_model(args.model)
    base = default_params(model)
    if args.guidance is not None:
        base = replace(base, guidance_scale=args.guidance)
    features = load_features(args.features) if args.features else None
    groups = set(args.only.split(","))
    results = []
    for kind in args.kinds.split(","):
        print(f"\n### {kind}-object prompts, {args.split} split, {args.n} prompts (model {args.model}, "
              f"guidance {base.guidance_scale:g} unless stated)\n")
        print("| setting | fidelity | quality | diversity | FD | s |\n| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, tags, params, samples in rows(base):
            if tags["group"] not in groups:
                continue
            t0 = time.time()
            r = evaluate(model, kind, args.split, args.n, samples, params, features=features)
            seconds = time.time() - t0
            div = f"{r['diversity']:.3f}" if "diversity" in r else "-"
            fd = f"{r['fd']:.2f}" if "fd" in r else "-"
            print(f"| {name} | {r['fidelity']:.3f} | {r['quality']:.3f} | {div} | {fd} | {seconds:.0f} |", flush=True)
            results.append({"kind": kind, "split": args.split, "setting": name, **tags, "seconds": seconds,
                            **{k: r[k] for k in ("fidelity", "quality", "diversity", "fd", "failures") if k in r}})
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        plot(results, args.out / "sweep.png")
        print(f"\nwrote {args.out / 'results.json'} and {args.out / 'sweep.png'}")


if __name__ == "__main__":
    main()
