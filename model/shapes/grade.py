"""The exact parser and grader of shapes images: what ``parse`` reads back from an image, and whether
it shows every fact a caption of model/shapes/scenes.py states (``satisfies``, ``faithful``).

The parser classifies each pixel as a mix of the background and one palette colour (so a blurred
edge, as a VQVAE reconstruction gives, is still the right colour), labels connected components,
and reads shape from the fill ratio of the bounding box, size from its extent, place from its centre.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from vqdiff.model.shapes.scenes import (BACKGROUND, COLOURS, _COLOUR_NAMES, Mention, Scene, Stated, _at, _holds,
                                        _rel_margin, half_extent)

_PALETTE = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32)  # (C, 3)
_BG = np.array(BACKGROUND, dtype=np.float32)  # (3,)


@dataclass(frozen=True)
class ParsedObj:
    shape: str | None  # None: a blob of no recognisable shape (the parse is then not clean)
    colour: str
    size: str
    cx: float
    cy: float


@dataclass(frozen=True)
class Parsed:
    objects: tuple[ParsedObj, ...]
    clean: bool  # every foreground pixel is in an object of one palette colour and a known shape


_UNKNOWN = -1  # a foreground pixel that is no mix of the background and one palette colour
_BACK = -2
_RESIDUAL_MAX = 60.0  # RGB distance off the background-to-colour line; noise sigma 10 gives ~14
_MIN_PURITY = 0.9  # share of a blob's core pixels in its majority colour
_CORE = 0.75  # a pixel at least this far from the background to its colour is in a blob's core
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _classify(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) int: palette index, _UNKNOWN or _BACK; and (H, W) float: the colour's share of the mix.
    A pixel is foreground when it is more than half of the way from the background to its nearest
    palette colour, so blur keeps edges in place."""
    p = image.astype(np.float32) - _BG  # (H, W, 3)
    d = _PALETTE - _BG  # (C, 3)
    alpha = np.clip(p @ d.T / (d * d).sum(1), 0.0, 1.0)  # (H, W, C) share of colour c in the mix
    resid = np.linalg.norm(p[:, :, None, :] - alpha[..., None] * d, axis=-1)  # (H, W, C)
    best = resid.argmin(-1)  # (H, W)
    a = np.take_along_axis(alpha, best[..., None], -1)[..., 0]  # (H, W)
    r = np.take_along_axis(resid, best[..., None], -1)[..., 0]  # (H, W)
    labels = np.where(r <= _RESIDUAL_MAX, best, _UNKNOWN)
    return np.where(a >= 0.5, labels, _BACK), a


def _components(mask: np.ndarray) -> np.ndarray:
    """(H, W) int, 8-connected component ids of ``mask`` (-1 outside), by min-label propagation."""
    h, w = mask.shape
    big = h * w
    ids = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        padded = np.pad(ids, 1, constant_values=big)
        nxt = ids.copy()
        for dy, dx in _NEIGHBOURS:
            nxt = np.minimum(nxt, padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w])
        nxt = np.where(mask, nxt, big)
        if np.array_equal(nxt, ids):
            return np.where(mask, ids, -1)
        ids = nxt


def _shape_of(blob: np.ndarray) -> str | None:
    """Shape of a (h, w) bool crop. The triangle (apex up) has a third as much area in its top half
    as in its bottom half, which survives blur; square and circle differ by fill ratio (1 vs pi/4)."""
    h, w = blob.shape
    if abs(h - w) > max(2, 0.25 * max(h, w)):
        return None
    fill = blob.sum() / (h * w)
    top, bottom = blob[: h // 2].sum(), blob[h - h // 2:].sum()  # (odd h: the middle row is in neither)
    if top < 0.8 * bottom:
        return "triangle" if 0.35 <= fill < 0.88 else None
    if top > 1.25 * bottom:
        return None  # upside down: no shape here looks like that
    if fill >= 0.9:
        return "square"
    if fill >= 0.68:
        return "circle"
    return None


def parse(image: np.ndarray) -> Parsed:
    """The objects in an (H, W, 3) uint8 image, and whether it is clean."""
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"parse wants a square (H, W, 3) image, got shape {image.shape}")
    side = image.shape[0]
    labels, alpha = _classify(image)  # (H, W), (H, W)
    comps = _components(labels != _BACK)  # (H, W)
    small, large = half_extent("small", side) * 2, half_extent("large", side) * 2
    min_area = 0.25 * small * small  # a small triangle covers about half of small * small
    objects, clean = [], True
    for cid in np.unique(comps[comps >= 0]):
        ys, xs = np.nonzero(comps == cid)
        core = alpha[ys, xs] >= _CORE  # colour is judged away from edges, where noise can tip
        colours = labels[ys, xs][core] if core.any() else labels[ys, xs]  # yellow to orange
        counts = np.bincount(colours[colours >= 0], minlength=len(_COLOUR_NAMES))
        if len(ys) < min_area or counts.max() < _MIN_PURITY * len(colours):
            clean = False  # a speck, or a blob of mixed or unknown colour
            if len(ys) < min_area or counts.max() == 0:
                continue
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        shape = _shape_of(comps[y0:y1, x0:x1] == cid)
        clean &= shape is not None
        extent = max(y1 - y0, x1 - x0)
        objects.append(ParsedObj(
            shape=shape, colour=_COLOUR_NAMES[int(counts.argmax())],
            size="small" if extent < (small + large) / 2 else "large",
            cx=(x0 + x1) / 2, cy=(y0 + y1) / 2))
    return Parsed(tuple(objects), bool(clean))


def mention_facts(obj: ParsedObj, m: Mention, image_size: int) -> dict[str, bool]:
    """Each fact the mention states ("shape", "colour", "size", "place") and whether ``obj`` shows it."""
    facts = {a: getattr(obj, a) == getattr(m, a) for a in ("shape", "colour", "size") if getattr(m, a) is not None}
    if m.place is not None:
        facts["place"] = _at(obj, m.place, image_size, generating=False)
    return facts


def assignment_facts(objs: Sequence[ParsedObj], stated: Stated) -> list[tuple[str, bool]]:
    """Every stated fact and whether it holds when ``objs[i]`` is taken as mention i: the mentions'
    facts, then the relation (by the check margin)."""
    facts = [kv for o, m in zip(objs, stated.mentions) for kv in mention_facts(o, m, stated.image_size).items()]
    if stated.relation is not None:
        i, rel, j = stated.relation
        facts.append(("relation", _holds(objs[i], objs[j], rel, _rel_margin(stated.image_size, generating=False))))
    return facts


def satisfies(objects: Parsed | Sequence[ParsedObj], stated: Stated) -> bool:
    """True when the objects can be matched one-to-one to the mentions with every stated fact true."""
    objs = objects.objects if isinstance(objects, Parsed) else tuple(objects)
    if len(objs) != len(stated.mentions):
        return False
    return any(all(ok for _, ok in assignment_facts(perm, stated))  # at most 3! assignments
               for perm in itertools.permutations(objs))


def faithful(image: np.ndarray, stated: Stated) -> bool:
    """The exact fidelity metric: the image parses cleanly and shows everything the caption states."""
    parsed = parse(image)
    return parsed.clean and satisfies(parsed, stated)


def reads_as(image: np.ndarray, scene: Scene, stated: Stated) -> bool:
    """The image parses back into exactly ``scene``: clean, every object's shape, colour and size
    recovered (centres within 1.5 px), and its caption's stated facts true. The evaluator's ceiling
    check: a real image, or its VQVAE reconstruction, should pass."""
    parsed = parse(image)
    if not parsed.clean or len(parsed.objects) != len(scene.objects):
        return False
    for perm in itertools.permutations(parsed.objects):
        if all((p.shape, p.colour, p.size) == (o.shape, o.colour, o.size)
               and abs(p.cx - o.cx) <= 1.5 and abs(p.cy - o.cy) <= 1.5
               for p, o in zip(perm, scene.objects)):
            return satisfies(parsed, stated)
    return False
