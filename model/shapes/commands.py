"""``vqdiff data shapes`` (the shapes dataset as an image-caption folder) and ``vqdiff train features``
(the benchmark's feature network)."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

from vqdiff.model.cli_args import add_quiet


def add_data_shapes(parser: argparse.ArgumentParser) -> None:
    from vqdiff.model.shapes.scenes import CaptionRates

    rates = CaptionRates()  # the benchmark's captions
    parser.add_argument("out", type=Path, help="image-caption folder to write (captions.jsonl + images/)")
    parser.add_argument("--n", type=int, required=True, help="images")
    parser.add_argument("--start", type=int, default=0,
                        help="first index: images are generate(i) for i in [start, start + n)")
    parser.add_argument("--split", choices=["train", "heldout", "unpaired", "all"], default="train",
                        help="train: the held-out colour/shape pairs never appear; heldout: the first object is one "
                             "of them; unpaired: they appear in images, but no caption names both colour and shape; "
                             "all: they appear in images and captions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--append", action="store_true", help="add to an existing folder (numbering continues)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes that draw the images (the folder is the same for any number)")
    parser.add_argument("--place-rate", type=float, default=rates.place,
                        help="how often a one-object caption states the object's place, when one holds "
                             "(default, the benchmark's: %(default)s)")
    parser.add_argument("--place-rate-many", type=float, default=rates.place_many,
                        help="how often each object of a list caption ('a and b', 'a, b and c') states its place "
                             "(default, the benchmark's: %(default)s); the images do not change, only the captions")
    add_quiet(parser)
    parser.set_defaults(func=data_shapes)


def data_shapes(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from vqdiff.model.shapes.scenes import CaptionRates, pairs
    from vqdiff.model.train.data import write_folder

    if args.n < 1:
        raise ValueError(f"--n: {args.n} is not allowed; expected an integer >= 1")
    if args.start < 0:
        raise ValueError(f"--start: {args.start} is not allowed; expected an integer >= 0")
    for flag, v in (("--place-rate", args.place_rate), ("--place-rate-many", args.place_rate_many)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{flag}: {v} is not allowed; expected a rate in [0, 1]")
    if args.workers < 1:
        raise ValueError(f"--workers: {args.workers} is not allowed; expected an integer >= 1")
    rates = CaptionRates(place=args.place_rate, place_many=args.place_rate_many)
    items = pairs(range(args.start, args.start + args.n), seed=args.seed, split=args.split, rates=rates,
                  workers=args.workers)
    write_folder(args.out, tqdm(items, total=args.n, desc="images", unit="img", disable=args.quiet), append=args.append)
    print(f"{args.out}: {'appended ' if args.append else ''}{args.n} images, split {args.split}, seed {args.seed}, "
          f"generate(i) for i in [{args.start}, {args.start + args.n}), {rates}")


def add_train_features(parser: argparse.ArgumentParser) -> None:
    from vqdiff.model.shapes.features import train_features

    d = {k: p.default for k, p in inspect.signature(train_features).parameters.items()}
    parser.add_argument("--out", type=Path, required=True, help="folder: model.safetensors, config.json")
    parser.add_argument("--steps", type=int, default=d["steps"], help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"], help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=d["lr"], help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d["seed"], help="(default: %(default)s)")
    add_quiet(parser)
    parser.set_defaults(func=train_features_run)


def train_features_run(args: argparse.Namespace) -> None:
    from vqdiff.model.shapes.features import train_features

    print(train_features(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         progress=not args.quiet))
