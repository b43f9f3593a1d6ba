"""``vqdiff generate``: images from a prompt, one PNG each; ``vqdiff edit``: an image's masked region
repainted from a prompt, or variations of it (model/sampling/edit.py). The generation flags
(``--steps``, ``--guidance-scale``, ...) are ``GenerationParams``' fields; a flag not given keeps the
model folder's default (``vqdiff eval`` takes the same flags)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vqdiff.model.cli_args import add_fields, add_quiet, given_fields
from vqdiff.model.sampling.params import GenerationParams, image_seed


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, one flag per generation parameter but the seed, --device, --quiet."""
    parser.add_argument("--model", type=Path, default=None,
                        help="model folder (diffusers layout); default: $VQDIFF_MODEL, else the embedded model")
    add_fields(parser, GenerationParams, skip=("seed",), unset=True, unset_help="default: the model folder's")
    parser.add_argument("--device", default="cpu")
    add_quiet(parser)


def load(args: argparse.Namespace):
    """The model of ``--model`` (or the default model folder) on ``--device``; sets ``args.model``."""
    from vqdiff.model.io.default import default_model_dir
    from vqdiff.model.io.folder import load_model

    if args.model is None:
        args.model = default_model_dir()
    return load_model(args.model, device=args.device)


def params_from_args(args: argparse.Namespace, model) -> GenerationParams:
    """The model folder's defaults, overridden by the flags given."""
    from vqdiff.model.sampling.sampler import request_params

    return request_params(model, given_fields(GenerationParams, args, skip=("seed",)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt")
    parser.add_argument("-o", "--out", default="out.png", help="PNG path; with --n > 1, NAME-i.png")
    parser.add_argument("--n", type=int, default=1, help="images (seeds seed, seed+1, ...)")
    parser.add_argument("--seed", type=int)
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def png_paths(out: str | Path, n: int) -> list[Path]:
    """OUT for one image, else OUT-0.png, OUT-1.png, ..."""
    out = Path(out)
    return [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def write_pngs(model, tokens, paths: list[Path]) -> None:
    """(B, N) token grids -> one PNG file per image, each grid decoded alone: the same bytes the
    server sends for the same request (model/io/images.py)."""
    from vqdiff.model.io.images import decode_pngs

    for png, path in zip(decode_pngs(model, tokens, batch=1), paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)


def image_params(args: argparse.Namespace, model) -> list[GenerationParams]:
    """The flags' parameters for each of the ``--n`` images, seed ``--seed + i`` (a random seed if
    none), resolved: a parameter the model cannot take fails here, before any work."""
    from vqdiff.model.sampling.rng import random_seed

    if args.n < 1:
        raise ValueError(f"--n: {args.n} is not allowed; expected an integer >= 1")
    base = params_from_args(args, model)
    seed = args.seed if args.seed is not None else random_seed()
    c = model.config.transformer
    return [GenerationParams.from_dict({"seed": image_seed(seed, i)}, base).resolve(
        num_tokens=c.num_tokens, num_timesteps=c.num_timesteps, has_null=model.null_cond is not None)
        for i in range(args.n)]


def sample_to_pngs(args: argparse.Namespace, model, params: list[GenerationParams], desc: str, inits=None):
    """Sample ``args.prompt`` once per params (a progress bar unless ``--quiet``) and write the PNGs
    (``png_paths``); returns the paths and the parameters as resolved."""
    from tqdm import tqdm

    from vqdiff.model.sampling.sampler import sample

    with tqdm(total=max(p.steps for p in params), desc=desc, unit="step", disable=args.quiet) as bar:
        result = sample(model, [args.prompt] * len(params), params, on_step=lambda states: bar.update(1),
                        decode=False, inits=inits)
    paths = png_paths(args.out, len(params))
    write_pngs(model, result.tokens, paths)
    return paths, result.params


def run(args: argparse.Namespace) -> None:
    model = load(args)
    for path, p in zip(*sample_to_pngs(args, model, image_params(args, model), "denoising")):
        print(f"{path}  seed={p.seed} sampler={p.sampler} steps={p.steps} guidance_scale={p.guidance_scale}")


def add_edit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, help="PNG at the model's image size")
    parser.add_argument("prompt", nargs="?", default="", help="what to draw in the region (default: empty)")
    parser.add_argument("--mask", type=Path, help="PNG of the image's size: its transparent pixels (alpha 0) are "
                                                  "repainted; without --mask or --strength, the image's own alpha")
    parser.add_argument("--strength", type=float, help="a variation: the share of tokens repainted, in (0, 1]")
    parser.add_argument("-o", "--out", default="out.png", help="PNG path; with --n > 1, NAME-i.png")
    parser.add_argument("--n", type=int, default=1, help="images (seeds seed, seed+1, ...)")
    parser.add_argument("--seed", type=int)
    add_model_arguments(parser)
    parser.set_defaults(func=run_edit)


def run_edit(args: argparse.Namespace) -> None:
    """The same request the server takes (model/io/edit_input.py checks it: sizes, the mask)."""
    from vqdiff.model.io import edit_input as edits
    from vqdiff.model.io.edit_input import EditInput
    from vqdiff.model.sampling.edit import edit_params

    image = _read(args.image, "image")
    request = EditInput(image=image, mask=None if args.strength is not None else
                        (_read(args.mask, "--mask") if args.mask else image), strength=args.strength)
    model = load(args)
    limit = max(len(image), len(request.mask or b""))  # the CLI has no upload limit
    repainted = edits.check(request, model.config, limit)
    params = [edit_params(p, repainted) for p in image_params(args, model)]
    inits = edits.start_grids(model, request, params[0].seed, args.n, limit)
    n = model.config.transformer.num_tokens
    for path, p in zip(*sample_to_pngs(args, model, params, "repainting", inits)):
        print(f"{path}  seed={p.seed} sampler={p.sampler} steps={p.steps} repainted={repainted}/{n} tokens")


def _read(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"{name}: cannot read {path}: {e.strerror}") from None
