"""Two ``vqdiff eval`` runs on the same prompts, compared prompt by prompt.

A decision between two models ("is the candidate at or above the default?") is a paired question:
both draw the same prompts with the same image seeds, so the noise of the prompts cancels and only
the prompts on which the two disagree carry the difference. ``vqdiff eval --outcomes FILE`` writes
each image's outcome; ``--against OTHER`` prints, per kind and split, the difference of fidelity
(this run minus OTHER) over the prompts both ran, its standard error over those prompts, and the
prompts only one of them honours.

The file is JSON lines, one per image:
``{"kind", "split", "seed", "prompt", "sample", "caption", "failure"}`` (failure: None when the image
honours its prompt, else ``evaluate.failure``'s reason). Prompt ``i`` of a seed is the same for any
``--n`` above ``i`` (``scenes.prompt_scenes``), so a run of 300 prompts pairs with the first 300 of a
run of 1000.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

KEYS = ("kind", "split", "seed", "prompt", "sample", "caption", "failure")


def standard_error(x) -> float:
    """Standard error of the mean of a sequence of numbers (nan below two): their spread (ddof 1) / sqrt(n)."""
    x = np.asarray(x, np.float64)
    return float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")


def flatten(rows: list[dict], seed: int) -> list[dict]:
    """The outcomes of ``evaluate`` results (one per kind and split, prompt seed ``seed``), one dict
    per image with every key of ``KEYS``."""
    return [{"kind": r["kind"], "split": r["split"], "seed": seed, **o} for r in rows for o in r["outcomes"]]


def write_outcomes(path: str | Path, outcomes: list[dict]) -> None:
    """Outcomes (``flatten``'s) as JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(o) + "\n" for o in outcomes))


def read_outcomes(path: str | Path) -> list[dict]:
    """The lines ``write_outcomes`` wrote; ValueError naming the file and line on anything else."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such outcomes file (write one with `vqdiff eval --outcomes FILE`)")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            o = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
        missing = [k for k in KEYS if not isinstance(o, dict) or k not in o]
        if missing:
            raise ValueError(f"{path}:{n}: missing {missing}; an outcomes line has {list(KEYS)}")
        out.append(o)
    return out


def check_pairable(other: list[dict], kinds: list[str], split: str, seed: int) -> None:
    """Before a run: ValueError unless ``other`` holds outcomes of every kind in ``kinds`` on ``split``
    and prompt seed ``seed`` (what the run will pair with)."""
    have = {(o["kind"], o["split"], o["seed"]) for o in other}
    missing = [k for k in kinds if (k, split, seed) not in have]
    if missing:
        raise ValueError(f"--against holds no outcomes of kind {missing} on split {split!r}, prompt seed {seed}; "
                         f"it has (kind, split, seed) {sorted(have)}")


def _per_prompt(outcomes: list[dict]) -> dict[tuple, dict[tuple, tuple[str, list[bool]]]]:
    """{(kind, split): {(seed, prompt): (caption, [honoured, ...] in sample order)}}."""
    groups: dict[tuple, dict[tuple, tuple[str, list[bool]]]] = {}
    for o in sorted(outcomes, key=lambda o: o["sample"]):
        caption, hits = groups.setdefault((o["kind"], o["split"]), {}).setdefault((o["seed"], o["prompt"]),
                                                                                  (o["caption"], []))
        hits.append(o["failure"] is None)
    return groups


def paired_difference(this: list[dict], other: list[dict]) -> list[dict]:
    """Per (kind, split) the two runs share: over the prompts both ran (same seed and index), the
    fidelity of each, the difference this - other with its standard error over prompts, and the
    prompts better (this honours more of its samples) and worse. Raises ValueError if they share no
    (kind, split), share no prompt there, or a shared prompt's caption differs (different benchmarks)."""
    a, b = _per_prompt(this), _per_prompt(other)
    common = [k for k in a if k in b]
    if not common:
        raise ValueError(f"the runs share no kind and split: this run has {sorted(a)}, the other {sorted(b)}")
    out = []
    for kind, split in common:
        pa, pb = a[(kind, split)], b[(kind, split)]
        keys = sorted(k for k in pa if k in pb)
        if not keys:
            raise ValueError(f"({kind}, {split}): the runs share no prompt (different prompt seeds?)")
        for k in keys:
            if pa[k][0] != pb[k][0]:
                raise ValueError(f"({kind}, {split}) prompt seed {k[0]} index {k[1]}: the captions differ "
                                 f"({pa[k][0]!r} against {pb[k][0]!r}); not the same benchmark")
        fa = np.array([np.mean(pa[k][1]) for k in keys])  # (n,) per-prompt fidelity
        fb = np.array([np.mean(pb[k][1]) for k in keys])
        d = fa - fb
        out.append({"kind": kind, "split": split, "prompts": len(keys), "this": float(fa.mean()),
                    "other": float(fb.mean()), "difference": float(d.mean()), "se": standard_error(d),
                    "better": int((d > 0).sum()), "worse": int((d < 0).sum())})
    return out


def format_paired(diffs: list[dict], other: str | Path) -> str:
    """``paired_difference`` as the lines ``vqdiff eval --against`` prints."""
    lines = [f"paired against {other} (this run - the other, over the prompts both ran):"]
    for r in diffs:
        lines.append(f"  {r['kind']}, {r['split']}: {r['prompts']} prompts, fidelity {r['this']:.3f} against "
                     f"{r['other']:.3f}: {r['difference']:+.3f} +- {r['se']:.3f} (SE); better on {r['better']} "
                     f"prompts, worse on {r['worse']}")
    return "\n".join(lines)
