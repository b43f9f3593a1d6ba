"""The shapes benchmark for token-space editing (``vqdiff eval --task edit``, ``--task variation``).

**Edit.** Each two-object scene of the benchmark's prompt set (``prompt_scenes("two", ...)``) is
rendered; its first object's bounding box, one pixel wider, is the region to repaint; the prompt
names a different object there (another shape and another colour, same size, never a held-out pair)
and the kept one, every attribute stated: "a large green circle and a small red square". Read back
with the exact parser (model/shapes/grade.py):

- ``fidelity``: the edited image parses cleanly and shows both stated objects;
- ``new``: an object of the new shape and colour is centred within 2 px of the replaced one;
- ``kept``: the kept object parses back unchanged (shape, colour, size, centre within 1.5 px);
- ``new_misses``: why ``new`` fails: ``nothing`` (no object centred within 3 px), ``place`` (the
  right one further than 2 px off), ``shape``, ``colour`` or ``shape+colour`` (the nearest object
  is another);
- ``border``: mean |edited - reconstruction| of the pixels (0-255) by the Chebyshev distance, in
  tokens, of their token from the repainted ones (the reconstruction decodes the source's own tokens;
  frozen tokens are identical, so any change there is the decoder's receptive field).

The same prompts generated from an all-masked grid give the reference (``generate`` row): what the
prompt alone reaches, and how often the kept object lands where it was by chance.

**Variation.** ``strength`` s of the tokens of each rendered scene repainted (chosen by the seed): the
share repainted, and the share of tokens that differ from the source's (a redrawn token may come
back equal), at each s.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from vqdiff.model.shapes import grade
from vqdiff.model.shapes import scenes as shapes
from vqdiff.model.shapes.scenes import HELDOUT, SHAPES, Mention, Obj, Scene, Stated, half_extent

COLOURS = tuple(shapes.COLOURS)


def swap_first(scene: Scene, rng: np.random.Generator) -> Obj:
    """The object that replaces ``scene.objects[0]``: same place and size, another shape and colour,
    not a held-out pair."""
    a = scene.objects[0]
    while True:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = COLOURS[int(rng.integers(len(COLOURS)))]
        if shape != a.shape and colour != a.colour and (colour, shape) not in HELDOUT:
            return replace(a, shape=shape, colour=colour)


def box_mask(obj: Obj, image_size: int, pad: int = 1) -> np.ndarray:
    """(H, W) bool: the object's bounding box, ``pad`` pixels wider on every side."""
    r = half_extent(obj.size, image_size) + pad
    ys, xs = np.mgrid[0:image_size, 0:image_size] + 0.5  # pixel centres
    return (np.abs(xs - obj.cx) <= r) & (np.abs(ys - obj.cy) <= r)


def caption(objects: tuple[Obj, ...], image_size: int) -> tuple[str, Stated]:
    """Every object with its size, colour and shape: "a large green circle and a small red square"."""
    mentions = tuple(Mention(shape=o.shape, colour=o.colour, size=o.size) for o in objects)
    text = " and ".join(shapes._noun_phrase(m) for m in mentions)
    return text, Stated(mentions, None, image_size)


def _matches(parsed: grade.Parsed, obj: Obj, tol: float, attrs=("shape", "colour", "size")) -> bool:
    return any(all(getattr(p, a) == getattr(obj, a) for a in attrs) and abs(p.cx - obj.cx) <= tol
               and abs(p.cy - obj.cy) <= tol for p in parsed.objects)


def new_miss(parsed: grade.Parsed, new: Obj) -> str | None:
    """Why the new object is not drawn in its place (``new_misses`` in the module docstring); None
    when it is."""
    if _matches(parsed, new, 2.0, ("shape", "colour")):
        return None
    near = [o for o in parsed.objects if abs(o.cx - new.cx) <= 3 and abs(o.cy - new.cy) <= 3]
    if not near:
        return "nothing"
    o = min(near, key=lambda o: abs(o.cx - new.cx) + abs(o.cy - new.cy))
    wrong = [a for a in ("shape", "colour") if getattr(o, a) != getattr(new, a)]
    return "+".join(wrong) or "place"


def token_distance(edit: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N,) bool repainted -> (height, width) long: each token's Chebyshev distance to the nearest
    repainted one (0 for those)."""
    grid = edit.view(height, width)
    ys, xs = torch.nonzero(grid, as_tuple=True)  # (M,)
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    d = torch.maximum((yy[..., None] - ys).abs(), (xx[..., None] - xs).abs())  # (h, w, M)
    return d.min(dim=-1).values


@torch.no_grad()
def evaluate_edits(model, n: int = 100, seed: int = 0, params=None, steps: tuple[int, ...] = (4, 16),
                   batch: int = 64, max_distance: int = 3) -> list[dict]:
    """One row per step count (each capped at the image's repainted tokens), then the ``generate``
    reference row (module docstring)."""
    from vqdiff.model.io.images import to_uint8
    from vqdiff.model.sampling.edit import edit_params, start_grids, token_mask
    from vqdiff.model.sampling.sampler import default_params, sample

    c, size = model.config.transformer, model.config.image_size
    base = params or default_params(model)
    rng = np.random.default_rng((seed, 7))
    jobs = []  # (source image, pixel mask, new object, kept object, prompt, stated)
    for i, (_, _, scene) in enumerate(shapes.prompt_scenes("two", "train", n, seed=seed, image_size=size)):
        new, kept = swap_first(scene, rng), scene.objects[1]
        text, stated = caption((new, kept), size)
        jobs.append((shapes.render(scene), box_mask(scene.objects[0], size), new, kept, text, stated))
    sources = torch.from_numpy(np.stack([j[0] for j in jobs])).permute(0, 3, 1, 2).float() / 255  # (n, 3, H, W)
    edits = [token_mask(torch.from_numpy(j[1]), c.height, c.width) for j in jobs]
    recon = to_uint8(model.decode(model.vqvae.tokenize(sources.to(model.device)))).numpy()  # (n, H, W, 3)
    grids = start_grids(model, sources, edits)
    f = size // c.height
    distance = [token_distance(e, c.height, c.width).repeat_interleave(f, 0).repeat_interleave(f, 1).numpy()
                for e in edits]  # (H, W) per image, in tokens

    rows = []
    for s in (*steps, None):  # None: generation from the same prompts
        images, used = [], []
        for lo in range(0, n, batch):
            chunk = range(lo, min(n, lo + batch))
            ps = [replace(base, seed=seed * 1_000_003 + i) for i in chunk]
            if s is not None:
                ps = [edit_params(replace(p, steps=s), int(edits[i].sum())) for p, i in zip(ps, chunk)]
            out = sample(model, [jobs[i][4] for i in chunk], ps, inits=[grids[i] for i in chunk] if s else None)
            images.append(to_uint8(out.images).numpy())
            used += [p.steps for p in ps]
        images = np.concatenate(images)  # (n, H, W, 3)
        parsed = [grade.parse(im) for im in images]
        row = {"task": "edit" if s else "generate", "steps": s or base.steps, "mean_steps": float(np.mean(used)),
               "images": images, "sources": np.stack([j[0] for j in jobs]), "n": n,
               "fidelity": float(np.mean([p.clean and grade.satisfies(p, j[5]) for p, j in zip(parsed, jobs)])),
               "new": float(np.mean([_matches(p, j[2], 2.0, ("shape", "colour")) for p, j in zip(parsed, jobs)])),
               "kept": float(np.mean([_matches(p, j[3], 1.5) for p, j in zip(parsed, jobs)]))}
        misses = [new_miss(p, j[2]) for p, j in zip(parsed, jobs)]
        row["new_misses"] = {k: misses.count(k) for k in sorted(set(misses) - {None})}
        if s is not None:
            diff = np.abs(images.astype(np.int16) - recon.astype(np.int16)).mean(-1)  # (n, H, W)
            dist = np.stack(distance)  # (n, H, W)
            row["border"] = {d: float(diff[np.minimum(dist, max_distance) == d].mean()) for d in range(max_distance + 1)}
            row["border_max"] = {d: int(diff[np.minimum(dist, max_distance) == d].max()) for d in range(max_distance + 1)}
        rows.append(row)
    return rows


@torch.no_grad()
def evaluate_variations(model, n: int = 100, seed: int = 0, params=None, strengths=(0.1, 0.5, 1.0),
                        batch: int = 64) -> list[dict]:
    """Per strength: the share of tokens repainted and the share that differ from the source's."""
    from vqdiff.model.sampling.edit import edit_params, start_grids, variation_mask
    from vqdiff.model.sampling.sampler import default_params, sample

    c, size = model.config.transformer, model.config.image_size
    base = params or default_params(model)
    found = shapes.prompt_scenes("two", "train", n, seed=seed, image_size=size)
    sources = torch.from_numpy(np.stack([shapes.render(s) for _, _, s in found])).permute(0, 3, 1, 2).float() / 255
    tokens = model.vqvae.tokenize(sources.to(model.device))  # (n, N)
    rows = []
    for strength in strengths:
        repainted, changed = [], []
        for lo in range(0, n, batch):
            chunk = range(lo, min(n, lo + batch))
            ps = [replace(base, seed=seed * 1_000_003 + i) for i in chunk]
            masks = [variation_mask(p.seed, strength, c.num_tokens) for p in ps]
            ps = [edit_params(p, int(m.sum())) for p, m in zip(ps, masks)]
            grids = start_grids(model, sources[lo : lo + len(ps)], masks)
            out = sample(model, [found[i][0] for i in chunk], ps, inits=grids, decode=False)
            repainted += [float(m.float().mean()) for m in masks]
            changed += (out.tokens.cpu() != tokens[lo : lo + len(ps)].cpu()).float().mean(dim=1).tolist()
        rows.append({"strength": strength, "repainted": float(np.mean(repainted)), "changed": float(np.mean(changed)),
                     "changed_sd": float(np.std(changed)), "n": n})
    return rows


def format_edit_report(rows: list[dict], params, model) -> str:
    p = params
    lines = [f"model {model}  sampler={p.sampler} guidance_scale={p.guidance_scale} truncation_rate={p.truncation_rate} "
             f"purity_weight={p.purity_weight}  (two-object scenes, first object replaced)",
             f"{'task':9s} {'steps':>5s} {'mean':>5s} {'prompts':>7s} {'fidelity':>8s} {'new':>6s} {'kept':>6s}  "
             "border |diff| by token distance 0/1/2/3+ (max)"]
    for r in rows:
        border = "" if "border" not in r else "  " + " / ".join(
            f"{r['border'][d]:.1f} ({r['border_max'][d]})" for d in sorted(r["border"]))
        lines.append(f"{r['task']:9s} {r['steps']:5d} {r['mean_steps']:5.1f} {r['n']:7d} {r['fidelity']:8.3f} "
                     f"{r['new']:6.3f} {r['kept']:6.3f}{border}")
    for r in rows:
        if r["task"] == "edit":
            why = ", ".join(f"{k} {v}" for k, v in sorted(r["new_misses"].items(), key=lambda kv: -kv[1])) or "none"
            lines.append(f"new object missed ({r['steps']} steps): {why}")
    return "\n".join(lines)


def format_variation_report(rows: list[dict], params, model) -> str:
    lines = [f"model {model}  sampler={params.sampler} steps<={params.steps} (two-object scenes)",
             f"{'strength':>8s} {'prompts':>7s} {'repainted':>9s} {'changed':>7s} {'sd':>6s}"]
    for r in rows:
        lines.append(f"{r['strength']:8.2f} {r['n']:7d} {r['repainted']:9.3f} {r['changed']:7.3f} {r['changed_sd']:6.3f}")
    return "\n".join(lines)
