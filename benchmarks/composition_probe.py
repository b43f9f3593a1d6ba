"""Why do held-out colour/shape pairs lose their shape? Two probes of the text encoder, no training.

    .venv/bin/python benchmarks/composition_probe.py --model models/default [--n 100] [--seed 0]

The text encoder is CLIP's: causal attention, so a token's state depends on the words before it.
In "a red triangle" the state at "triangle" has seen "red", a pair no training caption holds
(model/shapes/scenes.py, HELDOUT); the state at "red" has seen only "a" and is in distribution.

1. Contamination: for each shape, the state at the shape's position in "a {colour} {shape}" for
   every colour, compared with the mean state of the same shape after the colours seen with it
   (leave-one-out). A held-out pair far outside the seen pairs' spread is out of distribution.
2. Transplant: ``vqdiff eval`` with the text encoder's output edited. Wherever a held-out pair
   appears, the states from the shape's position on are taken from the same caption with the
   colour word replaced by a colour seen with that shape (``donor``); the colour's own state is
   the true one. If the transformer could bind a colour state to a shape state it has seen, the
   held-out fidelity rises to near the in-distribution one. The same edit on in-distribution
   prompts (every colour-shape pair, donor colour != colour) measures what the edit itself costs.
Prints a table of fidelity / quality / the held-out shape's and the colour's share per setting.
"""

from __future__ import annotations

import argparse
import time

import torch

from vqdiff.model.io.folder import load_model
from vqdiff.model.sampling.sampler import default_params
from vqdiff.model.shapes.evaluate import evaluate
from vqdiff.model.shapes.scenes import COLOURS, HELDOUT, SHAPES

HELD = dict(HELDOUT)  # colour -> its held-out shape


def donor(colour: str, shape: str) -> str:
    """A colour other than ``colour`` that training captions pair with ``shape`` (fixed: the next in order)."""
    names = list(COLOURS)
    for k in range(1, len(names)):
        c = names[(names.index(colour) + k) % len(names)]
        if HELD.get(c) != shape:
            return c
    raise AssertionError("unreachable")


def word_ids(te) -> tuple[dict[int, str], dict[int, str]]:
    ids = {w: te.tokenize([w])[0, 1].item() for w in (*COLOURS, *SHAPES)}  # (BOS, word, EOS, pad...)
    return {ids[c]: c for c in COLOURS}, {ids[s]: s for s in SHAPES}


def transplanting(te, scope: str):
    """A replacement for ``te.forward``: states from a held-out (scope 'heldout') or any ('all')
    colour-shape pair's shape position on come from the donor caption."""
    forward = te.forward
    colour_of, shape_of = word_ids(te)
    colour_id = {c: i for i, c in colour_of.items()}

    def edited(ids: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, D)
        h = forward(ids)  # (B, L, D)
        donor_ids, cut = ids.clone(), {}
        for b in range(ids.shape[0]):
            row = ids[b].tolist()
            for p in range(len(row) - 1):
                c, s = colour_of.get(row[p]), shape_of.get(row[p + 1])
                if c is None or s is None or (scope == "heldout" and HELD.get(c) != s):
                    continue
                donor_ids[b, p] = colour_id[donor(c, s)]
                cut.setdefault(b, p + 1)  # the first edited pair: states from here on are the donor's
        if not cut:
            return h
        h_donor = forward(donor_ids)  # (B, L, D)
        h = h.clone()
        for b, p in cut.items():
            h[b, p:] = h_donor[b, p:]
        return h

    return edited


@torch.no_grad()
def contamination(te) -> list[tuple[str, str, float, float, float]]:
    """(shape, colour, cosine to the seen pairs' mean, lowest seen cosine, seen mean) per held-out pair."""
    rows = []
    for shape in SHAPES:
        prompts = {c: f"a {c} {shape}" for c in COLOURS}
        h = te.encode(list(prompts.values()))[:, 3]  # (6, D): the state at the shape's position (BOS, a, colour, shape)
        states = dict(zip(prompts, h))
        seen = [c for c in COLOURS if HELD.get(c) != shape]

        def loo(c):  # cosine to the mean of the other seen colours' states
            others = torch.stack([states[o] for o in seen if o != c]).mean(0)
            return torch.nn.functional.cosine_similarity(states[c], others, dim=0).item()

        seen_cos = [loo(c) for c in seen]
        for c in COLOURS:
            if HELD.get(c) == shape:
                rows.append((shape, c, loo(c), min(seen_cos), sum(seen_cos) / len(seen_cos)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/default")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kind", default="one,two")
    args = ap.parse_args()
    model = load_model(args.model)
    te = model.text_encoder
    print("state at the shape's position in 'a {colour} {shape}': cosine to the seen colours' mean (leave-one-out)")
    print(f"{'shape':<9} {'held-out colour':<16} {'held-out':>8} {'seen min':>8} {'seen mean':>9}")
    for shape, colour, cos, lo, mean in contamination(te):
        print(f"{shape:<9} {colour:<16} {cos:8.4f} {lo:8.4f} {mean:9.4f}")

    params = default_params(model)
    forward = te.forward
    settings = [("heldout", "as trained", None), ("heldout", "transplant", "heldout"),
                ("train", "as trained", None), ("train", "transplant", "all")]
    print(f"\nvqdiff eval, the model's defaults, n={args.n}, prompt seed {args.seed}")
    print(f"{'kind':<5} {'split':<8} {'text states':<12} {'fidelity':>8} {'quality':>8} {'shape':>6} {'colour':>6} {'s':>5}")
    for kind in args.kind.split(","):
        for split, name, scope in settings:
            te.forward = forward if scope is None else transplanting(te, scope)
            t0 = time.time()
            r = evaluate(model, kind, split, args.n, 1, params, seed=args.seed)
            te.forward = forward
            share = {f: (a / b if b else float("nan")) for f, (a, b) in r["facts"].items()}
            print(f"{kind:<5} {split:<8} {name:<12} {r['fidelity']:8.3f} {r['quality']:8.3f} "
                  f"{share.get('shape', float('nan')):6.2f} {share.get('colour', float('nan')):6.2f} {time.time() - t0:5.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
