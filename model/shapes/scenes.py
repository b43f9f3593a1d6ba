"""A procedurally generated captioned dataset of flat shapes: scenes, their images, their captions.

The default model is meant to be trainable on a CPU, so its data is small: 32x32 images
of 1-3 non-overlapping, hard-edged shapes in exact palette colours on a white background. Captions
are drawn from a ``Scene`` by choosing which attributes to state (colour, size, shape, place,
relation), so many captions leave something open; the stated facts travel with the caption as a
``Stated`` value, which the exact parser of model/shapes/grade.py checks against an image.
"""

from __future__ import annotations

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
Split = Literal["train", "heldout", "unpaired", "all"]
# "unpaired": images of every colour/shape pair, held-out ones included, but no caption names both the
# colour and the shape of a held-out object (it says one, or neither): the pairs stay out of the text.
# "all": every pair in images and captions alike (data for a text encoder pretrained on more pairs
# than the generator sees)

_COLOUR_NAMES = tuple(COLOURS)


def half_extent(size: str, image_size: int = IMAGE_SIZE) -> int:
    """Half the side of a shape's bounding box: 4 px (small) or 7 px (large) at 32 px."""
    return round(image_size * (4 if size == "small" else 7) / 32)


def _margin(image_size: int) -> int:  # gap between bounding boxes: the parser never merges objects
    return max(2, round(image_size * 3 / 32))


# Placement thresholds; a caption states a fact only when it holds by the wider generation margin,
# and `satisfies` (grade.py) accepts it with the narrower check margin, so parser jitter never flips a fact.
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


# ---------------------------------------------------------------------------------------------
# Scenes and rendering


def _rng(seed: int, index: int, *extra: int) -> np.random.Generator:
    if index < 0 or seed < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed} index={index}")
    return np.random.default_rng((seed, index, *extra))


def _split_code(split: str) -> int:
    codes = {"train": 0, "heldout": 1, "unpaired": 2, "all": 3}
    if split not in codes:
        raise ValueError(f"split must be one of {list(codes)}, got {split!r}")
    return codes[split]


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
                    if split != "train" or (colour, shape) not in HELDOUT:
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
        held = (obj.colour, obj.shape) in HELDOUT
        keep_pair = split == "heldout" and held  # the composition under test
        mention = Mention(
            shape=obj.shape if keep_pair or rng.random() < 0.85 else None,
            colour=obj.colour if keep_pair or rng.random() < 0.75 else None,
            size=obj.size if rng.random() < 0.5 else None)
        if split == "unpaired" and held and mention.shape is not None and mention.colour is not None:
            mention = replace(mention, **{("colour", "shape")[int(rng.integers(2))]: None})  # never both
        mentions.append(mention)
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
