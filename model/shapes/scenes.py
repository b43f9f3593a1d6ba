"""A procedurally generated captioned dataset of flat shapes, and an exact parser to grade images.

The default model is trained on a CPU (REFERENCE.md section 10), so its data is small: 32x32 images
of 1-3 non-overlapping, hard-edged shapes in exact palette colours on a white background. Captions
are drawn from a ``Scene`` by choosing which attributes to state (colour, size, shape, place,
relation), so many captions leave something open; the stated facts travel with the caption as a
``Stated`` value, and ``satisfies`` checks them against what ``parse`` reads back from an image.

The parser classifies each pixel as a mix of the background and one palette colour (so a blurred
edge, as a VQVAE reconstruction gives, is still the right colour), labels connected components,
and reads shape from the fill ratio of the bounding box, size from its extent, place from its centre.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Literal, Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # saturated and far apart, also along the lines that join each one to the background
    "red": (220, 20, 20),
    "green": (20, 160, 40),
    "blue": (20, 60, 220),
    "yellow": (235, 200, 0),
    "purple": (150, 30, 170),
    "orange": (245, 120, 0),
}
SIZES = ("small", "large")
BACKGROUND = (255, 255, 255)
IMAGE_SIZE = 32
HELDOUT = (("red", "triangle"), ("green", "square"), ("blue", "circle"))  # never in "train"
PLACES = ("left", "right", "top", "bottom")  # "on the left", ..., "at the bottom"
RELATIONS = ("above", "below", "left", "right")  # "above", "below", "to the left of", "to the right of"
Split = Literal["train", "heldout"]

_COLOUR_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32)  # (C, 3)
_BG = np.array(BACKGROUND, dtype=np.float32)  # (3,)


def half_extent(size: str, image_size: int = IMAGE_SIZE) -> int:
    """Half the side of a shape's bounding box: 4 px (small) or 7 px (large) at 32 px."""
    return round(image_size * (4 if size == "small" else 7) / 32)


def _margin(image_size: int) -> int:  # gap between bounding boxes: the parser never merges objects
    return max(2, round(image_size * 3 / 32))


# Placement thresholds; a caption states a fact only when it holds by the wider generation margin,
# and `satisfies` accepts it with the narrower check margin, so parser jitter never flips a fact.
def _rel_margin(image_size: int, generating: bool) -> float:
    return image_size * (4 if generating else 2) / 32


def _place_fraction(generating: bool) -> float:
    return 0.34 if generating else 0.40


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cx: float  # centre of the bounding box, pixels from the left edge
    cy: float  # pixels from the top edge


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    image_size: int = IMAGE_SIZE


@dataclass(frozen=True)
class Mention:
    """What a caption says about one object; None = left open."""
    shape: str | None
    colour: str | None
    size: str | None
    place: str | None = None  # one of PLACES


@dataclass(frozen=True)
class Stated:
    """Every fact a caption states. The caption mentions every object, so the count is stated too."""
    mentions: tuple[Mention, ...]
    relation: tuple[int, str, int] | None = None  # (i, r, j): mention i is r of mention j
    image_size: int = IMAGE_SIZE


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


# ---------------------------------------------------------------------------------------------
# Scenes and rendering


def _rng(seed: int, index: int, *extra: int) -> np.random.Generator:
    if index < 0 or seed < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed} index={index}")
    return np.random.default_rng((seed, index, *extra))


def _split_code(split: str) -> int:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return 0 if split == "train" else 1


def _apart(a: Obj, b: Obj, image_size: int) -> bool:
    gap = half_extent(a.size, image_size) + half_extent(b.size, image_size) + _margin(image_size)
    return abs(a.cx - b.cx) >= gap or abs(a.cy - b.cy) >= gap


def sample_scene(rng: np.random.Generator, split: Split, n_objects: int | None = None,
                 image_size: int = IMAGE_SIZE) -> Scene:
    """1-3 non-overlapping objects; in "heldout" the first object is a held-out (colour, shape) pair."""
    _split_code(split)
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    if not 1 <= n <= 3:
        raise ValueError(f"n_objects must be 1, 2 or 3, got {n}")
    for _ in range(1000):  # rejection sampling: three large shapes fit in 32 px only in a few layouts
        objs: list[Obj] = []
        for k in range(n):
            if split == "heldout" and k == 0:
                colour, shape = HELDOUT[int(rng.integers(len(HELDOUT)))]
            else:
                while True:
                    colour = _COLOUR_NAMES[int(rng.integers(len(_COLOUR_NAMES)))]
                    shape = SHAPES[int(rng.integers(len(SHAPES)))]
                    if split == "heldout" or (colour, shape) not in HELDOUT:
                        break
            size = SIZES[int(rng.integers(2))]
            r = half_extent(size, image_size)
            cx, cy = (float(v) for v in rng.integers(r + 1, image_size - r, size=2))  # 1 px border
            obj = Obj(shape, colour, size, cx, cy)
            if not all(_apart(obj, o, image_size) for o in objs):
                break
            objs.append(obj)
        if len(objs) == n:
            return Scene(tuple(objs), image_size)
    raise RuntimeError(f"could not place {n} objects in {image_size} px")  # not reached at 32 px


def _shape_mask(obj: Obj, image_size: int) -> np.ndarray:
    """(H, W) bool; a pixel is inside when its centre is."""
    r = half_extent(obj.size, image_size)
    ys, xs = np.mgrid[0:image_size, 0:image_size] + 0.5  # (H, W) pixel centres
    dx, dy = xs - obj.cx, ys - obj.cy
    if obj.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if obj.shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if obj.shape == "triangle":  # apex up, base 2r, height 2r
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene, size: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8, hard edges, exact palette colours."""
    side = scene.image_size if size is None else size
    if side != scene.image_size:
        raise ValueError(f"scene was laid out for {scene.image_size} px, not {side}")
    image = np.empty((side, side, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in scene.objects:
        image[_shape_mask(obj, side)] = COLOURS[obj.colour]
    return image


# ---------------------------------------------------------------------------------------------
# Captions


def _holds(a, b, rel: str, margin: float) -> bool:  # a, b: anything with cx, cy
    if rel == "above":
        return a.cy + margin <= b.cy
    if rel == "below":
        return a.cy >= b.cy + margin
    if rel == "left":
        return a.cx + margin <= b.cx
    if rel == "right":
        return a.cx >= b.cx + margin
    raise ValueError(f"unknown relation {rel!r}")


def _at(obj, place: str, image_size: int, generating: bool) -> bool:
    f = _place_fraction(generating) * image_size
    return {"left": obj.cx <= f, "right": obj.cx >= image_size - f,
            "top": obj.cy <= f, "bottom": obj.cy >= image_size - f}[place]


def _noun_phrase(m: Mention) -> str:
    words = [w for w in (m.size, m.colour, m.shape or "shape") if w]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def _phrase_place(place: str) -> str:
    return f"on the {place}" if place in ("left", "right") else f"at the {place}"


def _phrase_relation(rel: str) -> str:
    return rel if rel in ("above", "below") else f"to the {rel} of"


@dataclass(frozen=True)
class CaptionRates:
    """How often ``describe`` states a place or a relation when one holds. The defaults write the
    benchmark's captions (every evaluation prompt uses them); a training set may state places more
    often, since a place word moves an object by a third of the image and so carries few nats."""
    place: float = 0.6  # a one-object caption states the object's place
    place_many: float = 0.0  # each object of a list caption ("a and b", "a, b and c") states its place
    relation: float = 0.75  # a two-object caption states a relation instead of "and"

    def __post_init__(self) -> None:
        for name in ("place", "place_many", "relation"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"CaptionRates.{name} must be in [0, 1], got {v}")


def _draw_place(rng: np.random.Generator, obj: Obj, image_size: int, rate: float) -> str | None:
    places = [p for p in PLACES if _at(obj, p, image_size, generating=True)]
    if places and rng.random() < rate:
        return places[int(rng.integers(len(places)))]
    return None


def describe(rng: np.random.Generator, scene: Scene, split: Split = "train",
             rates: CaptionRates = CaptionRates()) -> tuple[str, Stated]:
    """A caption of every object in ``scene``, stating a random subset of attributes."""
    side = scene.image_size
    order = rng.permutation(len(scene.objects))
    objs = [scene.objects[i] for i in order]
    mentions = []
    for obj in objs:
        keep_pair = split == "heldout" and (obj.colour, obj.shape) in HELDOUT  # the composition under test
        mentions.append(Mention(
            shape=obj.shape if keep_pair or rng.random() < 0.85 else None,
            colour=obj.colour if keep_pair or rng.random() < 0.75 else None,
            size=obj.size if rng.random() < 0.5 else None))
    phrases = [_noun_phrase(m) for m in mentions]
    relation = None
    if len(objs) == 2:
        rels = [r for r in RELATIONS if _holds(objs[0], objs[1], r, _rel_margin(side, True))]
        if rels and rng.random() < rates.relation:
            relation = (0, rels[int(rng.integers(len(rels)))], 1)
    # places: always a draw for one object; for a list only when asked (so default captions keep their stream)
    if len(objs) == 1 or (relation is None and rates.place_many > 0):
        rate = rates.place if len(objs) == 1 else rates.place_many
        for k, obj in enumerate(objs):
            place = _draw_place(rng, obj, side, rate)
            if place is not None:
                mentions[k] = replace(mentions[k], place=place)
                phrases[k] += " " + _phrase_place(place)
    if len(objs) == 1:
        text = phrases[0]
    elif relation is not None:
        text = f"{phrases[0]} {_phrase_relation(relation[1])} {phrases[1]}"
    elif len(objs) == 2:
        text = f"{phrases[0]} and {phrases[1]}"
    else:
        text = f"{phrases[0]}, {phrases[1]} and {phrases[2]}"
    return text, Stated(tuple(mentions), relation, side)


def words() -> list[str]:
    """Every word a caption can use (captions also use ',' glued to the word before it)."""
    ws = ["a", "an", *SIZES, *_COLOUR_NAMES, *SHAPES, "shape", "on", "at", "the", *PLACES,
          "above", "below", "to", "of", "and"]
    return list(dict.fromkeys(ws))


def generate(index: int, seed: int = 0, split: Split = "train", image_size: int = IMAGE_SIZE,
             rates: CaptionRates = CaptionRates()) -> tuple[np.ndarray, str, Stated, Scene]:
    """(image (H, W, 3) uint8, caption, stated facts, scene), a pure function of its arguments.
    The scene (so the image) does not depend on ``rates``; only the caption does."""
    rng = _rng(seed, index, _split_code(split))
    scene = sample_scene(rng, split, image_size=image_size)
    text, stated = describe(rng, scene, split, rates)
    return render(scene), text, stated, scene


def _pair(args: tuple[int, int, str, CaptionRates]) -> tuple[np.ndarray, str]:
    image, text, _, _ = generate(args[0], seed=args[1], split=args[2], rates=args[3])
    return image, text


def pairs(indices: Sequence[int], seed: int = 0, split: Split = "train", rates: CaptionRates = CaptionRates(),
          workers: int = 1, chunk: int = 256):
    """Yield (image, caption) of ``generate(i, ...)`` for i in ``indices``, in order. ``workers`` > 1
    generates in that many processes (the images are the same: each is a pure function of i)."""
    if workers < 1:  # checked now, not at the first item
        raise ValueError(f"workers: {workers} is not allowed; expected an integer >= 1")
    jobs = ((i, seed, split, rates) for i in indices)
    return map(_pair, jobs) if workers == 1 else _pooled(jobs, workers, chunk)


def _pooled(jobs, workers: int, chunk: int):
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:  # spawn: the caller may hold torch's threads
        yield from pool.imap(_pair, jobs, chunksize=chunk)


def prompt_set(kind: Literal["one", "two", "three"], split: Split = "train", n: int = 100,
               seed: int = 0, image_size: int = IMAGE_SIZE) -> list[tuple[str, Stated]]:
    """``n`` evaluation prompts with 1, 2 or 3 objects, independent of ``generate``'s stream."""
    return [(caption, stated) for caption, stated, _ in prompt_scenes(kind, split, n, seed, image_size)]


def prompt_scenes(kind: Literal["one", "two", "three"], split: Split = "train", n: int = 100,
                  seed: int = 0, image_size: int = IMAGE_SIZE) -> list[tuple[str, Stated, Scene]]:
    """``prompt_set`` with the scene each prompt was written from (one image that honours it)."""
    counts = {"one": 1, "two": 2, "three": 3}
    if kind not in counts:
        raise ValueError(f"kind must be 'one', 'two' or 'three', got {kind!r}")
    out = []
    for i in range(n):
        rng = _rng(seed, i, _split_code(split), 100 + counts[kind])
        scene = sample_scene(rng, split, counts[kind], image_size)
        out.append((*describe(rng, scene, split), scene))
    return out


# ---------------------------------------------------------------------------------------------
# Parsing and checking

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
