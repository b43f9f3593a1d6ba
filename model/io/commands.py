"""``vqdiff info``, ``vqdiff init`` and ``vqdiff convert``: model folders (model/io/folder.py) from the
command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_info(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path)
    parser.add_argument("--load", action="store_true", help="also load the weights and count parameters")
    parser.set_defaults(func=info)


def info(args: argparse.Namespace) -> None:
    from vqdiff.model.io.folder import load_model, read_config

    cfg = read_config(args.model)
    t = cfg.transformer
    print(f"model folder: {args.model}")
    print(f"  transformer: {t.num_layers} layers, width {t.dim} ({t.num_heads} x {t.head_dim}), "
          f"{t.height}x{t.width} tokens, K={t.num_embed}, T={t.num_timesteps}")
    print(f"  vqvae: channels {cfg.vqvae.block_out_channels}, f{cfg.vqvae.downsample}, images {cfg.image_size}px")
    print(f"  text encoder: CLIP {cfg.text_encoder.num_hidden_layers} layers, width {cfg.text_encoder.hidden_size}")
    print(f"  null condition: {'learnable' if cfg.learnable_null else 'empty prompt (zero-shot)'}")
    if args.load:
        model = load_model(args.model)
        for name in ("transformer", "vqvae", "text_encoder", "null_cond"):
            part = getattr(model, name)
            if part is not None:
                print(f"  {name}: {sum(p.numel() for p in part.parameters()):,} parameters")


def add_init(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--words", default="", help="comma-separated words that become single tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    parser.set_defaults(func=init)


def init(args: argparse.Namespace) -> None:
    from vqdiff.model.config import from_name
    from vqdiff.model.io.folder import random_model, save_model
    from vqdiff.model.net.tokenizer import word_tokenizer

    words = args.words.split(",") if args.words else []
    model = random_model(from_name(args.preset), word_tokenizer(words), seed=args.seed)
    print(save_model(model, args.out, overwrite=args.overwrite))


DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # the flag's words: torch dtypes


def add_convert(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--dtype", default="fp32", help=f"on-disk precision: {' | '.join(DTYPES)}")
    parser.add_argument("--variant", help="read weights of this variant (e.g. fp16)")
    parser.add_argument("--defaults", help='generation defaults as JSON, e.g. \'{"steps": 16}\'')
    parser.add_argument("--provenance", help="JSON recorded in vqdiff.json (how the model was made)")
    parser.add_argument("--mix", type=Path, metavar="OTHER",
                        help="write (1 - alpha) SRC + alpha OTHER, weight by weight (OTHER: the same architecture, "
                             "e.g. a fine-tune of SRC: weight-space interpolation as in WiSE-FT)")
    parser.add_argument("--alpha", type=float, help="with --mix: OTHER's share, in [0, 1]")
    parser.add_argument("--average", type=Path, nargs="+", metavar="OTHER",
                        help="write the mean of SRC and every OTHER, weight by weight (the same architecture: "
                             "snapshots of one run, as in stochastic weight averaging, or fine-tunes of one model)")
    parser.add_argument("--overwrite", action="store_true")
    parser.set_defaults(func=convert)


def convert(args: argparse.Namespace) -> None:
    import torch

    from vqdiff.model.io.folder import load_model, save_model
    from vqdiff.model.sampling.params import split_defaults

    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype: {args.dtype!r} is not allowed; expected one of {list(DTYPES)}")
    dtype = getattr(torch, DTYPES[args.dtype])
    if (args.mix is None) != (args.alpha is None):
        raise ValueError("--mix and --alpha go together")
    if args.mix is not None and args.average:
        raise ValueError("--mix and --average are two ways of combining models: give one")
    model = load_model(args.src, variant=args.variant)
    if args.mix is not None:
        from vqdiff.model.io.folder import interpolate

        model = interpolate(model, load_model(args.mix, variant=args.variant), args.alpha)
    if args.average:
        from vqdiff.model.io.folder import average

        model = average(model, (load_model(m, variant=args.variant) for m in args.average))
    if args.defaults:
        model.generation_defaults = json.loads(args.defaults)
        split_defaults(model.generation_defaults)  # fail now, not at the next load
    extra = {"provenance": json.loads(args.provenance)} if args.provenance else None
    print(save_model(model, args.dst, dtype=dtype, overwrite=args.overwrite, extra=extra))
