"""The ``vqdiff`` command. Subcommands grow with the project; each one fails with one line and a
non-zero exit on bad input, never a traceback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_info(args: argparse.Namespace) -> None:
    from model.folder import load_model, read_config

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


def cmd_init(args: argparse.Namespace) -> None:
    from model.config import from_name
    from model.folder import random_model, save_model
    from model.tokenizer import word_tokenizer

    words = args.words.split(",") if args.words else []
    model = random_model(from_name(args.preset), word_tokenizer(words), seed=args.seed)
    print(save_model(model, args.out, overwrite=args.overwrite))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vqdiff", description="Improved VQ-Diffusion: model tools and server")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="describe a model folder")
    s.add_argument("model", type=Path)
    s.add_argument("--load", action="store_true", help="also load the weights and count parameters")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("init", help="write a randomly initialised model folder from a preset")
    s.add_argument("out", type=Path)
    s.add_argument("--preset", default="tiny")
    s.add_argument("--words", default="", help="comma-separated words that become single tokens")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_init)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # ModelFolderError is a ValueError
        print(f"vqdiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
