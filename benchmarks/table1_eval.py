"""Table 1 of the paper with standard errors: evaluate its models at several guidance scales and
prompt sets, then summarise the replicates.

    # one model, every g and prompt seed, one JSON line per (g, prompt seed, kind):
    python benchmarks/table1_eval.py eval --model RUN/learnable_s0/model --setting "learnable null" \
        --replicate 0 --uncond null --g 1,2,3,5 --prompt-seeds 0 --out t1.jsonl [--device cuda]
    # the table: mean +- standard error over replicates, and the paper's orderings tested
    python benchmarks/table1_eval.py summary t1.jsonl [more.jsonl ...]

A replicate is one (fine-tune seed, prompt set) pair: replicate k of a fine-tuned setting is the
fine-tune of training seed k, evaluated on prompt seed k; the base (one model) is evaluated on
the same prompt seeds. So a cell's spread holds both the training and the prompt noise, and
differences between settings are paired by k (same prompts).

Every evaluation is ``vqdiff eval``'s (model/shapes/evaluate.py): ``--n`` prompts of one and of two
objects (of ``--split``), ``--samples`` images each, the purity sampler at ``--steps`` forwards,
truncation 1.0, the features net's FD when models/features is there.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

METRICS = ("fidelity", "quality", "diversity", "fd")
ORDER = ("zero-shot", "null text", "learnable null")  # the paper: each better than the one before
STEPS = 16  # the table's forwards (4 tokens a forward on the 8 x 8 grid)
BASELINE = "no guidance"  # the base at g = 1: what guidance has to beat
# Student's t at 0.975 for 1..9 degrees of freedom: a paired mean over n replicates is beyond the
# noise (two-sided, 5%) when |mean| > T975[n - 2] SE; with three replicates that is 4.30 SE, not 2
# (more than ten replicates use 9's 2.26: a little strict)
T975 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26)


def label(kind: str, split: str, steps: int) -> str:
    """A row's kind in the table: held-out prompts and other forwards than STEPS are kinds of their own
    ('one, heldout', 'two, 64 forwards'), so the summary never pools them with the main rows."""
    return ", ".join([kind] + ([split] if split != "train" else []) + ([f"{steps} forwards"] if steps != STEPS else []))


def evaluate_model(args: argparse.Namespace) -> None:
    from vqdiff.model.io.default import FEATURES
    from vqdiff.model.io.folder import load_model
    from vqdiff.model.sampling.sampler import request_params
    from vqdiff.model.shapes.evaluate import evaluate
    from vqdiff.model.shapes.features import load_features

    model = load_model(args.model, device=args.device)
    features = load_features(FEATURES) if (FEATURES / "config.json").is_file() else None
    with open(args.out, "a") as out:
        for g in (float(x) for x in args.g.split(",")):
            params = request_params(model, {"sampler": "purity", "steps": args.steps, "guidance_scale": g,
                                            "truncation_rate": 1.0, "uncond": args.uncond})
            for seed in (int(x) for x in args.prompt_seeds.split(",")):
                for kind in args.kind.split(","):
                    r = evaluate(model, kind, args.split, args.n, args.samples, params, seed=seed, batch=args.batch,
                                 features=features)
                    row = {"setting": args.setting, "replicate": args.replicate if args.replicate is not None else seed,
                           "g": g, "prompt_seed": seed, "kind": label(kind, args.split, args.steps),
                           "n": args.n, "samples": args.samples,
                           "steps": args.steps, "model": str(args.model),
                           **{m: r[m] for m in METRICS if m in r}}
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    print(json.dumps(row), flush=True)


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (nan with fewer than two values)."""
    from vqdiff.model.shapes.paired import standard_error

    return sum(xs) / len(xs), standard_error(xs)


def read_rows(paths: list[str]) -> list[dict]:
    rows = []
    for p in paths:
        for n, line in enumerate(Path(p).read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{n}: not a JSON line ({e})") from None
    return rows


def cells(rows: list[dict]) -> dict[tuple, dict[int, dict]]:
    """(setting, g, kind) -> replicate -> row; a (setting, g, kind, replicate) given twice fails."""
    out: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in rows:
        key = (r["setting"], r["g"], r["kind"])
        if r["replicate"] in out[key]:
            raise ValueError(f"{key} replicate {r['replicate']} appears twice")
        out[key][r["replicate"]] = r
    return out


def fmt(m: float, se: float, digits: int = 3) -> str:
    return f"{m:.{digits}f}" if math.isnan(se) else f"{m:.{digits}f} ± {se:.{digits}f}"


def paired(ra: dict[int, dict], rb: dict[int, dict]) -> list[str] | None:
    """Each metric's b - a over the replicates both have (mean ± SE), marked where a t-test over them
    says it is beyond the noise (``T975``); None when they share no replicate."""
    common = sorted(set(ra) & set(rb))
    if not common:
        return None
    vals = []
    for m in METRICS:
        if not all(m in ra[k] and m in rb[k] for k in common):
            vals.append("-")
            continue
        d, se = mean_se([rb[k][m] - ra[k][m] for k in common])
        better = (d < 0) if m == "fd" else (d > 0)
        t = T975[min(len(common), len(T975) + 1) - 2] if len(common) > 1 else math.inf
        beyond = not math.isnan(se) and abs(d) > t * se
        vals.append(fmt(d, se, 2 if m == "fd" else 3) + (" **" + ("better" if better else "worse") + "**" if beyond else ""))
    return vals


def summary(rows: list[dict]) -> str:
    """The table (mean ± SE over replicates per cell) and the paired differences between settings."""
    table = cells(rows)
    kinds = sorted({k for _, _, k in table})
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    lines = []
    for kind in kinds:
        lines += [f"### {kind}", "", "| setting | g | replicates | " + " | ".join(METRICS) + " |",
                  "| --- | ---: | ---: | " + " | ".join("---:" for _ in METRICS) + " |"]
        for s in settings:
            for g in sorted({g for s2, g, k in table if s2 == s and k == kind}):
                reps = table[(s, g, kind)]
                vals = [fmt(*mean_se([r[m] for r in reps.values()]), 2 if m == "fd" else 3)
                        if all(m in r for r in reps.values()) else "-" for m in METRICS]
                lines.append(f"| {s} | {g:g} | {len(reps)} | " + " | ".join(vals) + " |")
        lines.append("")
    header = ["| kind | g | pair | " + " | ".join(METRICS) + " |",
              "| --- | ---: | --- | " + " | ".join("---" for _ in METRICS) + " |"]
    lines += ["### The paper's orderings: paired differences (later minus earlier, mean ± SE over replicates)", "",
              "A difference is marked beyond the noise when a paired t-test over the replicates says so (5%, two-sided: "
              "|mean| > 4.30 SE with three); FD is better when lower.", "", *header]
    present = [s for s in ORDER if s in settings]
    for kind in kinds:
        for g in sorted({g for _, g, k in table if k == kind}):
            for i, a in enumerate(present):
                for b in present[i + 1:]:
                    row = paired(table.get((a, g, kind), {}), table.get((b, g, kind), {}))
                    if row is not None:
                        lines.append(f"| {kind} | {g:g} | {b} vs {a} | " + " | ".join(row) + " |")
    base = [(s, g, k) for s, g, k in table if s == BASELINE]
    if base:
        lines += ["", f"### Guidance against {BASELINE}: paired differences (the setting at g minus {BASELINE})", "",
                  *header]
        for s0, g0, kind in sorted(base, key=lambda key: key[2]):
            for s in present:
                for g in sorted({g for s2, g, k in table if s2 == s and k == kind}):
                    row = paired(table[(s0, g0, kind)], table[(s, g, kind)])
                    if row is not None:
                        lines.append(f"| {kind} | {g:g} | {s} vs {BASELINE} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval", help="evaluate one model; appends JSON lines to --out")
    e.add_argument("--model", required=True)
    e.add_argument("--setting", required=True, help="its row name: no guidance | zero-shot | null text | learnable null")
    e.add_argument("--replicate", type=int, default=None, help="its replicate index (default: the prompt seed)")
    e.add_argument("--uncond", default="empty", choices=("empty", "null"))
    e.add_argument("--g", default="2,3,5")
    e.add_argument("--prompt-seeds", default="0")
    e.add_argument("--kind", default="one,two")
    e.add_argument("--split", default="train", choices=("train", "heldout"),
                   help="heldout rows are their own kinds in the table ('one, heldout')")
    e.add_argument("--batch", type=int, default=64, help="images per sampling batch (512 on a GPU)")
    e.add_argument("--n", type=int, default=100)
    e.add_argument("--samples", type=int, default=2)
    e.add_argument("--steps", type=int, default=STEPS)
    e.add_argument("--device", default="cpu")
    e.add_argument("--out", required=True)
    s = sub.add_parser("summary", help="the table of JSON lines files")
    s.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    if args.cmd == "eval":
        evaluate_model(args)
    else:
        print(summary(read_rows(args.files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
