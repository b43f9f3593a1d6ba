"""Evaluation on the shapes benchmark: exact prompt fidelity, parse quality, diversity.

Every generated image is read back by the deterministic parser of ``model/shapes/grade.py``; a prompt
is honoured when the image parses cleanly and every stated attribute and relation holds.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch

from vqdiff.model.shapes import grade, paired
from vqdiff.model.shapes import scenes as shapes


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to("cpu", torch.uint8).numpy()


@torch.no_grad()
def vqvae_ceiling(vqvae, n: int = 500, seed: int = 12345, split: str = "train", batch: int = 100) -> float:
    """Fraction of dataset images whose VQVAE reconstruction still reads as the same scene: the best
    prompt fidelity any generator can reach through this tokeniser."""
    vqvae.eval()
    ok = 0
    for start in range(0, n, batch):
        items = [shapes.generate(i, seed=seed, split=split) for i in range(start, min(n, start + batch))]
        x = torch.from_numpy(np.stack([it[0] for it in items])).permute(0, 3, 1, 2).float() / 255  # (b, 3, H, W)
        recon = to_uint8(vqvae.decode_tokens(vqvae.tokenize(x)))
        ok += sum(grade.reads_as(r, it[3], it[2]) for r, it in zip(recon, items))
    return ok / n


def _bits(tokens: torch.Tensor) -> float:
    """Entropy in bits of the empirical distribution of ``tokens`` (any shape)."""
    p = torch.bincount(tokens.flatten()).float()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum()) if p.numel() else 0.0


@torch.no_grad()
def tokeniser_stats(vqvae, n: int = 512, seed: int = 12345, split: str = "train") -> dict:
    """How a VQVAE spends its codes on n dataset images: codes used, bits per token, and the same
    for plain patches (every pixel one colour) and for plain-white ones: a generator must predict
    every distinction the tokeniser makes, even those the decoder renders alike."""
    vqvae.eval()
    x = torch.from_numpy(np.stack([shapes.generate(i, seed=seed, split=split)[0] for i in range(n)]))  # (n, H, W, 3)
    tokens = vqvae.tokenize(x.permute(0, 3, 1, 2).float() / 255)  # (n, h*w)
    f = x.shape[1] // int(round(tokens.shape[1] ** 0.5))
    patches = x.unfold(1, f, f).unfold(2, f, f).reshape(n, -1, 3, f * f)  # (n, h*w, 3, f*f)
    plain = (patches == patches[..., :1]).all(-1).all(-1)  # (n, h*w)
    white = plain & (patches[..., 0] == 255).all(-1)
    out = {"images": n, "codes_used": int(tokens.unique().numel()), "bits_per_token": round(_bits(tokens), 2)}
    for name, m in (("plain", plain), ("white", white)):
        out |= {f"{name}_share": round(float(m.float().mean()), 3), f"{name}_codes": int(tokens[m].unique().numel()),
                f"{name}_bits": round(_bits(tokens[m]), 2)}
    return out


def failure(parsed: grade.Parsed, stated: shapes.Stated) -> str | None:
    """Why an image misses its prompt, the first reason that applies: ``unclean`` (mixed colours or a
    broken shape: the joint-distribution failure), ``count`` (wrong number of objects), ``attributes``
    (no object-to-mention match has every colour/shape/size/place right), ``relation``; None if it
    honours the prompt."""
    if not parsed.clean:
        return "unclean"
    if len(parsed.objects) != len(stated.mentions):
        return "count"
    if grade.satisfies(parsed, stated):
        return None
    from dataclasses import replace

    return "relation" if grade.satisfies(parsed, replace(stated, relation=None)) else "attributes"


def best_assignment(parsed: grade.Parsed, stated: shapes.Stated) -> tuple[tuple, list[tuple[str, bool]]]:
    """The objects in mention order and their facts, under the assignment that shows the most stated
    facts (the first such); ((), []) unless the image has the stated number of objects."""
    if len(parsed.objects) != len(stated.mentions):
        return (), []
    best, best_facts, best_shown = (), [], -1
    for perm in itertools.permutations(parsed.objects):
        facts = grade.assignment_facts(perm, stated)
        shown = sum(ok for _, ok in facts)
        if shown > best_shown:
            best, best_facts, best_shown = perm, facts, shown
    return best, best_facts


def fact_tally(parsed: grade.Parsed, stated: shapes.Stated) -> dict[str, tuple[int, int]]:
    """Per kind of stated fact (shape, colour, size, place, relation): (shown, stated) in one image.

    Objects are assigned to mentions the way that shows the most stated facts. Only images with the
    stated number of objects are tallied ({} otherwise: those miss as ``count``). An unclean image
    is tallied too; a blob of no recognisable shape shows no shape."""
    tally: dict[str, tuple[int, int]] = {}
    for kind, ok in best_assignment(parsed, stated)[1]:
        got, n = tally.get(kind, (0, 0))
        tally[kind] = (got + int(ok), n + 1)
    return tally


SHAPE_MISSES = ("another mention's", "held-out pair", "another shape", "no shape")


def shape_misses(parsed: grade.Parsed, stated: shapes.Stated) -> dict[str, int]:
    """What is drawn where a stated shape is not, under ``best_assignment``: the shape another mention
    of the caption states (a shape carried across objects), a held-out (colour, shape) pair, another
    shape, or no recognisable shape. Keys of ``SHAPE_MISSES``."""
    objs, _ = best_assignment(parsed, stated)
    out: dict[str, int] = {}
    for i, (o, m) in enumerate(zip(objs, stated.mentions)):
        if m.shape is None or o.shape == m.shape:
            continue
        others = {mm.shape for j, mm in enumerate(stated.mentions) if j != i}
        why = ("no shape" if o.shape is None else "another mention's" if o.shape in others
               else "held-out pair" if (o.colour, o.shape) in shapes.HELDOUT else "another shape")
        out[why] = out.get(why, 0) + 1
    return out


def shows_heldout(parsed: grade.Parsed) -> bool:
    """Whether an image draws a held-out (colour, shape) pair. A train-split prompt never asks for one:
    in its images a held-out pair is a composition the model learnt elsewhere, drawn where the
    caption leaves it open or in place of a stated fact."""
    return any(o.shape is not None and (o.colour, o.shape) in shapes.HELDOUT for o in parsed.objects)


def _signature(parsed: grade.Parsed) -> tuple:
    """A coarse description of what an image shows, to count distinct outcomes of one prompt."""
    return tuple(sorted((o.shape or "?", o.colour, o.size, round(o.cx / 4), round(o.cy / 4)) for o in parsed.objects))


@torch.no_grad()
def evaluate(model, kind: str, split: str = "train", n: int = 100, samples: int = 1, params=None,
             seed: int = 0, batch: int = 64, on_batch=None, features=None) -> dict:
    """Generate ``samples`` images for each of ``n`` prompts of ``kind`` and read them back.

    Returns prompt fidelity (clean and every stated fact holds), quality (parses cleanly), diversity
    (distinct outcomes per prompt / samples; only with samples > 1), and the images (uint8) in prompt
    order for a grid; ``failures`` counts why images miss (``failure``) and ``facts`` maps each kind of
    stated fact to (shown, stated) summed over the images with the right object count (``fact_tally``),
    which says what the model gets wrong; ``heldout_drawn`` is (images that draw a held-out pair, how
    many of those miss their prompt) (``shows_heldout``); ``shapes_missed`` says what the images that miss
    on attributes draw where a stated shape is not (``shape_misses``). With ``features`` (a ``vqdiff.model.shapes.features.FeatureNet``), also ``fd``: the Fréchet
    distance between the generated images and one real image drawn for each prompt.
    """
    from dataclasses import replace

    from vqdiff.model.sampling.sampler import default_params, sample

    base = params or default_params(model)
    prompts = shapes.prompt_set(kind, split, n, seed=seed)
    jobs = [(p, replace(base, seed=seed * 1_000_003 + i * samples + j)) for i, p in enumerate(prompts) for j in range(samples)]
    images, faithful, clean, signatures, failures, facts = [], [], [], {}, {}, {}
    heldout_drawn = [0, 0]  # images that draw a held-out pair, of them misses
    shapes_missed: dict[str, int] = {}  # in the images that miss on attributes: what is drawn instead
    outcomes = []  # one per image, in job order: what `--outcomes` writes (model/shapes/paired.py)
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        out = to_uint8(sample(model, [p[0] for p, _ in chunk], [q for _, q in chunk]).images)
        for k, (img, ((caption, stated), _)) in enumerate(zip(out, chunk)):
            parsed = grade.parse(img)
            images.append(img)
            clean.append(parsed.clean)
            why = failure(parsed, stated)
            faithful.append(why is None)
            outcomes.append({"prompt": (start + k) // samples, "sample": (start + k) % samples, "caption": caption,
                             "failure": why})
            if why is not None:
                failures[why] = failures.get(why, 0) + 1
            if why == "attributes":
                for k2, v in shape_misses(parsed, stated).items():
                    shapes_missed[k2] = shapes_missed.get(k2, 0) + v
            if shows_heldout(parsed):
                heldout_drawn[0] += 1
                heldout_drawn[1] += why is not None
            for fact, (shown, n_stated) in fact_tally(parsed, stated).items():
                a, b = facts.get(fact, (0, 0))
                facts[fact] = (a + shown, b + n_stated)
            signatures.setdefault((start + k) // samples, set()).add(_signature(parsed))
        if on_batch is not None:
            on_batch(len(images), len(jobs))
    result = {"kind": kind, "split": split, "prompts": n, "samples": samples,
              "fidelity": float(np.mean(faithful)), "quality": float(np.mean(clean)), "images": np.stack(images),
              "failures": failures, "facts": facts,
              "heldout_drawn": tuple(heldout_drawn), "shapes_missed": shapes_missed, "outcomes": outcomes}
    # standard errors over prompts (an image's outcome depends on its prompt, so a prompt's samples
    # are one unit): the spread of the per-prompt means / sqrt(n)
    for name, hits in (("fidelity", faithful), ("quality", clean)):
        result[f"{name}_se"] = paired.standard_error(np.asarray(hits, np.float64).reshape(n, samples).mean(1))
    if samples > 1:
        result["diversity"] = float(np.mean([len(s) / samples for s in signatures.values()]))
    if features is not None:
        from vqdiff.model.shapes.features import embed, frechet_distance

        size = model.config.image_size
        real = np.stack([shapes.render(scene, size) for _, _, scene in shapes.prompt_scenes(kind, split, n, seed=seed)])
        result["fd"] = frechet_distance(embed(features, result["images"]), embed(features, real))
    return result


def grid(images: np.ndarray, columns: int = 8, scale: int = 4) -> np.ndarray:
    """(M, H, W, 3) uint8 -> one image, ``columns`` per row, each pixel ``scale`` x ``scale``."""
    m, h, w, _ = images.shape
    rows = -(-m // columns)
    canvas = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, 3), 128, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = img
    return canvas.repeat(scale, 0).repeat(scale, 1)


def format_report(rows: list[dict], params, model: str | Path) -> str:
    """``evaluate`` results (one per kind and split) as the text ``vqdiff eval`` prints: the
    parameters, a table of the scores, then per row the misses by reason and the facts shown."""
    p = params
    lines = [f"model {model}  sampler={p.sampler} steps={p.steps} guidance_scale={p.guidance_scale} "
             f"truncation_rate={p.truncation_rate} purity_weight={p.purity_weight} unmask_schedule={p.unmask_schedule} "
             f"uncond={p.uncond}",
             f"{'kind':6s} {'split':8s} {'prompts':>7s} {'samples':>7s} {'fidelity':>8s} {'quality':>8s} "
             f"{'diversity':>9s} {'FD':>8s}"]
    for r in rows:
        div = f"{r['diversity']:9.3f}" if "diversity" in r else f"{'-':>9s}"
        fd = f"{r['fd']:8.3f}" if "fd" in r else f"{'-':>8s}"
        lines.append(f"{r['kind']:6s} {r['split']:8s} {r['prompts']:7d} {r['samples']:7d} {r['fidelity']:8.3f} "
                     f"{r['quality']:8.3f} {div} {fd}")
    for r in rows:
        lines.append(f"standard errors over prompts ({r['kind']}, {r['split']}): fidelity {r['fidelity_se']:.3f}, "
                     f"quality {r['quality_se']:.3f}")
    for r in rows:
        why = ", ".join(f"{k} {v}" for k, v in sorted(r["failures"].items(), key=lambda kv: -kv[1])) or "none"
        lines.append(f"misses ({r['kind']}, {r['split']}): {why}")
    for r in rows:
        shown = ", ".join(f"{k} {a / n:.2f} ({a}/{n})" for k, (a, n) in sorted(r["facts"].items())) or "none"
        lines.append(f"facts shown, right-count images ({r['kind']}, {r['split']}): {shown}")
    for r in rows:
        drawn, missed = r["heldout_drawn"]
        lines.append(f"held-out pairs drawn ({r['kind']}, {r['split']}): in {drawn} images, {missed} of them misses")
    for r in rows:
        m = r["shapes_missed"]
        lines.append(f"stated shapes missed in attribute misses ({r['kind']}, {r['split']}): {sum(m.values())}: "
                     + ", ".join(f"{k} {m.get(k, 0)}" for k in SHAPE_MISSES))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``vqdiff eval``: these flags, and the generation flags of ``vqdiff generate``."""
    from vqdiff.model.sampling.generate import add_model_arguments

    parser.add_argument("--task", choices=("generate", "edit", "variation"), default="generate",
                        help="generate: prompts from scratch; edit: replace one object of two-object scenes "
                             "(model/shapes/edit_eval.py); variation: the share of tokens a strength changes")
    parser.add_argument("--edit-steps", default="4,16", help="--task edit: step counts (each capped at the "
                                                              "repainted tokens)")
    parser.add_argument("--strengths", default="0.1,0.5,1.0", help="--task variation: strengths")
    parser.add_argument("--kind", default="one", help="one | two | three objects per prompt (comma-separated for several)")
    parser.add_argument("--split", default="train", help="train | heldout (colour/shape pairs never trained on)")
    parser.add_argument("--n", type=int, default=100, help="prompts")
    parser.add_argument("--samples", type=int, default=1, help="images per prompt (> 1 measures diversity)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=Path, help="write the images as one PNG grid")
    parser.add_argument("--outcomes", type=Path, help="write each image's outcome (JSON lines: prompt, caption, "
                                                       "failure) for a paired comparison (model/shapes/paired.py)")
    parser.add_argument("--against", type=Path, help="an --outcomes file of another run on the same prompts: also "
                                                      "print the paired difference of fidelity and its standard error")
    parser.add_argument("--features", type=Path, default=None,
                        help="feature network for the Fréchet distance (default: models/features when present)")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from PIL import Image
    from tqdm import tqdm

    from vqdiff.model.io.default import FEATURES
    from vqdiff.model.sampling.generate import load, params_from_args

    model = load(args)
    params = params_from_args(args, model)
    features = None
    feature_dir = args.features or (FEATURES if (FEATURES / "config.json").is_file() else None)
    if feature_dir is not None:
        from vqdiff.model.shapes.features import load_features

        features = load_features(feature_dir)
    c = model.config.transformer
    params.resolve(num_tokens=c.num_tokens, num_timesteps=c.num_timesteps, has_null=model.null_cond is not None, seed=0)
    if args.task != "generate":
        if args.outcomes or args.against:
            raise ValueError("--outcomes and --against are for --task generate")
        return run_edit_task(args, model, params)
    other = None
    if args.against is not None:  # a file that cannot pair fails before the run
        other = paired.read_outcomes(args.against)
        paired.check_pairable(other, args.kind.split(","), args.split, args.seed)
    rows = []
    for kind in args.kind.split(","):
        with tqdm(total=args.n * args.samples, desc=f"eval {kind}", unit="img", disable=args.quiet) as bar:
            rows.append(evaluate(model, kind, args.split, args.n, args.samples, params, seed=args.seed,
                                 on_batch=lambda done, total: bar.update(done - bar.n), features=features))
    print(format_report(rows, params, args.model))
    mine = paired.flatten(rows, args.seed)
    if args.outcomes:
        paired.write_outcomes(args.outcomes, mine)
    if other is not None:
        print(paired.format_paired(paired.paired_difference(mine, other), args.against))
    if args.grid:
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid(np.concatenate([r["images"] for r in rows]))).save(args.grid)


def run_edit_task(args: argparse.Namespace, model, params) -> None:
    """``--task edit`` / ``--task variation`` (model/shapes/edit_eval.py)."""
    from PIL import Image

    from vqdiff.model.shapes import edit_eval

    if args.task == "edit":
        steps = tuple(int(s) for s in args.edit_steps.split(","))
        rows = edit_eval.evaluate_edits(model, args.n, args.seed, params, steps)
        print(edit_eval.format_edit_report(rows, params, args.model))
        if args.grid:
            args.grid.parent.mkdir(parents=True, exist_ok=True)
            first = [rows[0]["sources"][:16]] + [r["images"][:16] for r in rows]  # the sources, then each row
            Image.fromarray(grid(np.concatenate(first), columns=16)).save(args.grid)
    else:
        rows = edit_eval.evaluate_variations(model, args.n, args.seed, params,
                                             tuple(float(s) for s in args.strengths.split(",")))
        print(edit_eval.format_variation_report(rows, params, args.model))
