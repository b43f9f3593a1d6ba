"""The ``vqdiff`` command. Subcommands grow with the project; each one fails with one line and a
non-zero exit on bad input, never a traceback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vqdiff.model.io.default import FEATURES  # the standard library only, as below
from vqdiff.server.settings import add_flags  # the standard library only: `vqdiff --help` stays instant


def cmd_info(args: argparse.Namespace) -> None:
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


def cmd_init(args: argparse.Namespace) -> None:
    from vqdiff.model.config import from_name
    from vqdiff.model.io.folder import random_model, save_model
    from vqdiff.model.net.tokenizer import word_tokenizer

    words = args.words.split(",") if args.words else []
    model = random_model(from_name(args.preset), word_tokenizer(words), seed=args.seed)
    print(save_model(model, args.out, overwrite=args.overwrite))



PARAM_FLAGS = ("guidance_scale", "truncation_rate", "sampler", "steps", "purity_weight", "negative_prompt", "uncond")


def _add_param_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", type=Path, default=None,
                   help="model folder (diffusers layout); default: $VQDIFF_MODEL, else the embedded model")
    s.add_argument("--steps", type=int, help="transformer forward passes")
    s.add_argument("--guidance-scale", type=float)
    s.add_argument("--sampler", help="purity | random | posterior | skip")
    s.add_argument("--truncation-rate", type=float)
    s.add_argument("--purity-weight", type=float)
    s.add_argument("--negative-prompt")
    s.add_argument("--uncond", help="null | empty | negative | auto")
    s.add_argument("--device", default="cpu")
    s.add_argument("--quiet", action="store_true", help="no progress bar")


def _load(args: argparse.Namespace):
    from vqdiff.model.io.default import default_model_dir
    from vqdiff.model.io.folder import load_model

    if args.model is None:
        args.model = default_model_dir()
    return load_model(args.model, device=args.device)


def _params_from_args(args: argparse.Namespace, model):
    """The model folder's defaults, overridden by the flags given."""
    from vqdiff.model.sampling.sampler import request_params

    given = {k: getattr(args, k) for k in PARAM_FLAGS if getattr(args, k) is not None}
    return request_params(model, given)


def cmd_generate(args: argparse.Namespace) -> None:
    import torch
    from PIL import Image
    from tqdm import tqdm

    from vqdiff.model.sampling.params import GenerationParams
    from vqdiff.model.sampling.rng import random_seed
    from vqdiff.model.sampling.sampler import sample

    if args.n < 1:
        raise ValueError(f"--n: {args.n} is not allowed; expected an integer >= 1")
    model = _load(args)
    base = _params_from_args(args, model)
    seed = args.seed if args.seed is not None else random_seed()
    c = model.config.transformer
    params = [GenerationParams.from_dict({"seed": seed + i}, base).resolve(
        num_tokens=c.num_tokens, num_timesteps=c.num_timesteps, has_null=model.null_cond is not None)
        for i in range(args.n)]  # fails here, before any work, on parameters the model cannot take
    longest = max(p.steps for p in params)
    with tqdm(total=longest, desc="denoising", unit="step", disable=args.quiet) as bar:
        result = sample(model, [args.prompt] * args.n, params, on_step=lambda states: bar.update(1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    images = (result.images.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to("cpu", torch.uint8)
    for i, (img, p) in enumerate(zip(images.numpy(), result.params)):
        path = out if args.n == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        Image.fromarray(img).save(path, format="PNG")
        print(f"{path}  seed={p.seed} sampler={p.sampler} steps={p.steps} guidance_scale={p.guidance_scale}")


def cmd_eval(args: argparse.Namespace) -> None:
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from vqdiff.model.shapes.evaluate import evaluate, grid

    model = _load(args)
    params = _params_from_args(args, model)
    features = None
    feature_dir = args.features or (FEATURES if (FEATURES / "config.json").is_file() else None)
    if feature_dir is not None:
        from vqdiff.model.shapes.features import load_features

        features = load_features(feature_dir)
    c = model.config.transformer
    params.resolve(num_tokens=c.num_tokens, num_timesteps=c.num_timesteps, has_null=model.null_cond is not None, seed=0)
    rows, images = [], []
    for kind in args.kind.split(","):
        with tqdm(total=args.n * args.samples, desc=f"eval {kind}", unit="img", disable=args.quiet) as bar:
            r = evaluate(model, kind, args.split, args.n, args.samples, params, seed=args.seed,
                         on_batch=lambda done, total: bar.update(done - bar.n), features=features)
        rows.append(r)
        images.append(r["images"])
    p = params
    print(f"model {args.model}  sampler={p.sampler} steps={p.steps} guidance_scale={p.guidance_scale} "
          f"truncation_rate={p.truncation_rate} purity_weight={p.purity_weight} uncond={p.uncond}")
    print(f"{'kind':6s} {'split':8s} {'prompts':>7s} {'samples':>7s} {'fidelity':>8s} {'quality':>8s} {'diversity':>9s} "
          f"{'FD':>8s}")
    for r in rows:
        div = f"{r['diversity']:9.3f}" if "diversity" in r else f"{'-':>9s}"
        fd = f"{r['fd']:8.3f}" if "fd" in r else f"{'-':>8s}"
        print(f"{r['kind']:6s} {r['split']:8s} {r['prompts']:7d} {r['samples']:7d} {r['fidelity']:8.3f} {r['quality']:8.3f} "
              f"{div} {fd}")
    for r in rows:
        why = ", ".join(f"{k} {v}" for k, v in sorted(r["failures"].items(), key=lambda kv: -kv[1])) or "none"
        print(f"misses ({r['kind']}, {r['split']}): {why}")
    for r in rows:
        shown = ", ".join(f"{k} {a / n:.2f} ({a}/{n})" for k, (a, n) in sorted(r["facts"].items())) or "none"
        print(f"facts shown, right-count images ({r['kind']}, {r['split']}): {shown}")
    if args.grid:
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid(np.concatenate(images))).save(args.grid)


def cmd_convert(args: argparse.Namespace) -> None:
    import json

    import torch

    from vqdiff.model.io.folder import load_model, save_model

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if args.dtype not in dtypes:
        raise ValueError(f"--dtype: {args.dtype!r} is not allowed; expected one of {list(dtypes)}")
    model = load_model(args.src, variant=args.variant)
    if args.defaults:
        model.generation_defaults = json.loads(args.defaults)
        from vqdiff.model.sampling.params import GenerationParams

        GenerationParams.from_dict(model.generation_defaults)  # fail now, not at the next load
    extra = {"provenance": json.loads(args.provenance)} if args.provenance else None
    print(save_model(model, args.dst, dtype=dtypes[args.dtype], overwrite=args.overwrite, extra=extra))


def cmd_serve(args: argparse.Namespace) -> None:
    from vqdiff.server.settings import from_args
    from vqdiff.server.threads import set_wait_policy

    settings = from_args(args)  # bad settings fail here, before torch or the model loads
    set_wait_policy(settings.omp_wait_policy)  # libgomp reads it once, when torch loads it: first
    from vqdiff.server.main import serve

    serve(settings)


def cmd_data_shapes(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from vqdiff.model.train.data import write_folder
    from vqdiff.model.shapes.scenes import CaptionRates, pairs

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


def cmd_train_features(args: argparse.Namespace) -> None:
    from vqdiff.model.shapes.features import train_features

    print(train_features(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         progress=not args.quiet))


def cmd_train_vqvae(args: argparse.Namespace) -> None:
    from vqdiff.model.train.vqvae import VQVAETrainConfig, train_vqvae

    cfg = VQVAETrainConfig(data=str(args.data), out=str(args.out), preset=args.preset, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay, seed=args.seed,
                           restart_below=args.restart_below, restart_by_error=args.restart_by == "error",
                           tie_weight=args.tie_weight, ckpt_every=args.ckpt_every, log_every=args.log_every)
    print(train_vqvae(cfg, progress=not args.quiet))


def cmd_train_transformer(args: argparse.Namespace) -> None:
    from vqdiff.model.train.transformer import TransformerTrainConfig, train_transformer

    fine_tune = args.what == "null-cond"
    cfg = TransformerTrainConfig(
        data=str(args.data), out=str(args.out), vqvae=str(args.vqvae) if args.vqvae else None,
        init=str(args.model) if args.model else None, preset=args.preset, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, min_lr=args.min_lr, null_drop=args.null_drop,
        null_mode=args.null_mode, only_null=fine_tune and args.only_null, aux_weight=args.aux_weight,
        text_encoder=str(args.text_encoder) if args.text_encoder else None, freeze_text=args.freeze_text,
        precision=args.precision, device=args.device, time_budget_s=args.time_budget_s,
        log_every=args.log_every, ckpt_every=args.ckpt_every, seed=args.seed)
    print(train_transformer(cfg, progress=not args.quiet))


def cmd_train_clip(args: argparse.Namespace) -> None:
    from vqdiff.model.train.clip import CLIPTrainConfig, train_clip

    swap = tuple(w.strip() for w in args.swap.split(",") if w.strip())
    cfg = CLIPTrainConfig(data=str(args.data), out=str(args.out), preset=args.preset, steps=args.steps,
                          batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, swap=swap, seed=args.seed,
                          log_every=args.log_every, ckpt_every=args.ckpt_every)
    print(train_clip(cfg, progress=not args.quiet))


def _add_run_args(s: argparse.ArgumentParser, ckpt_every: int) -> None:
    """What every resumable trainer takes: checkpoint and log intervals, the seed, --quiet."""
    s.add_argument("--ckpt-every", type=int, default=ckpt_every)
    s.add_argument("--log-every", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vqdiff", description="Improved VQ-Diffusion: model tools and server")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="describe a model folder")
    s.add_argument("model", type=Path)
    s.add_argument("--load", action="store_true", help="also load the weights and count parameters")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("generate", help="generate images from a prompt")
    s.add_argument("prompt")
    s.add_argument("-o", "--out", default="out.png", help="PNG path; with --n > 1, NAME-i.png")
    s.add_argument("--n", type=int, default=1, help="images (seeds seed, seed+1, ...)")
    s.add_argument("--seed", type=int)
    _add_param_args(s)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("eval", help="prompt fidelity / quality / diversity on the shapes benchmark")
    s.add_argument("--kind", default="one", help="one | two | three objects per prompt (comma-separated for several)")
    s.add_argument("--split", default="train", help="train | heldout (colour/shape pairs never trained on)")
    s.add_argument("--n", type=int, default=100, help="prompts")
    s.add_argument("--samples", type=int, default=1, help="images per prompt (> 1 measures diversity)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--grid", type=Path, help="write the images as one PNG grid")
    s.add_argument("--features", type=Path, default=None,
                   help="feature network for the Fréchet distance (default: models/features when present)")
    _add_param_args(s)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("convert", help="rewrite a model folder as safetensors (dtype, defaults, provenance)")
    s.add_argument("src", type=Path)
    s.add_argument("dst", type=Path)
    s.add_argument("--dtype", default="fp32", help="on-disk precision: fp32 | fp16 | bf16")
    s.add_argument("--variant", help="read weights of this variant (e.g. fp16)")
    s.add_argument("--defaults", help='generation defaults as JSON, e.g. \'{"steps": 16}\'')
    s.add_argument("--provenance", help="JSON recorded in vqdiff.json (how the model was made)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("serve", help="run the inference server: HTTP (default port 8000) and gRPC (50051)",
                       description="Every setting is a flag --x-y and a variable VQDIFF_X_Y (server/settings.py); "
                                   "flags win over variables, variables over defaults.",
                       allow_abbrev=False)  # one name per setting: --max-row is not --max-rows
    add_flags(s)
    s.set_defaults(func=cmd_serve)

    data = sub.add_parser("data", help="write datasets as image-caption folders").add_subparsers(dest="what", required=True)
    s = data.add_parser("shapes", help="the procedural shapes dataset (model/shapes/scenes.py), deterministic from a seed")
    s.add_argument("out", type=Path, help="image-caption folder to write (captions.jsonl + images/)")
    s.add_argument("--n", type=int, required=True, help="images")
    s.add_argument("--start", type=int, default=0, help="first index: images are generate(i) for i in [start, start + n)")
    s.add_argument("--split", choices=["train", "heldout"], default="train",
                   help="train: the held-out colour/shape pairs never appear; heldout: the first object is one of them")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--append", action="store_true", help="add to an existing folder (numbering continues)")
    s.add_argument("--workers", type=int, default=1,
                   help="processes that draw the images (the folder is the same for any number)")
    s.add_argument("--place-rate", type=float, default=0.6,
                   help="how often a one-object caption states the object's place, when one holds (the benchmark: 0.6)")
    s.add_argument("--place-rate-many", type=float, default=0.0,
                   help="how often each object of a list caption ('a and b', 'a, b and c') states its place "
                        "(the benchmark: 0); the images do not change, only the captions")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_data_shapes)

    train = sub.add_parser("train", help="training entry points (resumable)").add_subparsers(dest="what", required=True)

    s = train.add_parser("features", help="the shapes benchmark's feature network (for the Fréchet distance)")
    s.add_argument("--out", type=Path, required=True, help="folder: model.safetensors, config.json")
    s.add_argument("--steps", type=int, default=2500)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--lr", type=float, default=2e-3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_train_features)
    s = train.add_parser("vqvae", help="train the VQVAE on an image-caption folder")
    s.add_argument("--data", type=Path, required=True, help="image-caption folder (see model/train/data.py)")
    s.add_argument("--out", type=Path, required=True, help="run folder: checkpoint.pt, train.log, vqvae/")
    s.add_argument("--preset", default="tiny")
    s.add_argument("--steps", type=int, default=2000)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=2e-4)
    s.add_argument("--ema-decay", type=float, default=0.99)
    s.add_argument("--restart-below", type=float, default=0.1, help="EMA usage below which a code restarts")
    s.add_argument("--restart-by", choices=["uniform", "error"], default="uniform",
                   help="where restarted codes go: a uniformly drawn latent, or one drawn in proportion to its "
                        "squared distance from its code (k-means++)")
    s.add_argument("--tie-weight", type=float, default=0.0,
                   help="weight of the loss tying the latents of pixel-identical patches (0: off)")
    _add_run_args(s, ckpt_every=200)
    s.set_defaults(func=cmd_train_vqvae)

    for what in ("transformer", "null-cond"):
        fine_tune = what == "null-cond"
        s = train.add_parser(what, help=(
            "fine-tune a trained model with a null condition (the paper's fine-tuning step)" if fine_tune
            else "train the diffusion transformer (and its text encoder) on an image-caption folder"))
        s.add_argument("--data", type=Path, required=True, help="image-caption folder (see model/train/data.py)")
        s.add_argument("--out", type=Path, required=True, help="run folder: checkpoint.pt, train.log, tokens.pt, model/")
        if fine_tune:
            s.add_argument("--model", type=Path, required=True, help="the model folder to fine-tune")
            s.set_defaults(vqvae=None)
            s.add_argument("--only-null", action="store_true", help="train only the learnable null")
        else:
            start = s.add_mutually_exclusive_group(required=True)
            start.add_argument("--vqvae", type=Path, help="OUT/vqvae of `vqdiff train vqvae` (a fresh model)")
            start.add_argument("--init", dest="model", type=Path, help="a model folder to continue training")
        s.add_argument("--preset", default="shapes")
        s.add_argument("--steps", type=int, default=1000 if fine_tune else 5000)
        s.add_argument("--batch-size", type=int, default=64)
        s.add_argument("--lr", type=float, default=1e-4 if fine_tune else 5e-4)
        s.add_argument("--warmup", type=int, default=50 if fine_tune else 200)
        s.add_argument("--min-lr", type=float, help="cosine-decay the learning rate to this at --steps (default: constant)")
        s.add_argument("--null-drop", type=float, default=0.1, help="rate at which a caption becomes the null")
        s.add_argument("--null-mode", default="learnable", help="learnable | empty | none")
        s.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                       help="bf16: the forward under bf16 autocast; weights, optimizer and loss stay fp32 "
                            "(on a 2-core AMX CPU the shapes preset gains only ~6%%)")
        s.add_argument("--aux-weight", type=float, help="weight of the auxiliary x0 cross-entropy beside the KL "
                       "(default: the preset's, 5e-4 as released; larger weights favour the noisiest steps)")
        s.add_argument("--text-encoder", type=Path,
                       help="use this text encoder and tokenizer (OUT of `vqdiff train clip`, or a model folder)")
        s.add_argument("--freeze-text", action="store_true", help="keep the text encoder fixed, as the paper keeps CLIP")
        s.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (batches are drawn on the CPU either way)")
        s.add_argument("--time-budget-s", type=float, help="fit the run into this many seconds: after 50 timed steps "
                       "it fixes --steps (at most the given value) so that the cosine tail ends in time")
        _add_run_args(s, ckpt_every=250)
        s.set_defaults(func=cmd_train_transformer)

    s = train.add_parser("clip", help="pretrain the text encoder contrastively (CLIP) on an image-caption folder")
    s.add_argument("--data", type=Path, required=True, help="image-caption folder (see model/train/data.py)")
    s.add_argument("--out", type=Path, required=True, help="run folder: checkpoint.pt, train.log, text_encoder/, tokenizer/")
    s.add_argument("--preset", default="shapes", help="the text encoder's shape and the image size")
    s.add_argument("--steps", type=int, default=3000)
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--lr", type=float, default=5e-4)
    s.add_argument("--warmup", type=int, default=100)
    s.add_argument("--swap", default="left:right,above:below,top:bottom",
                   help="comma-separated word pairs: a caption with one of them swapped is a hard negative ('' for none)")
    _add_run_args(s, ckpt_every=250)
    s.set_defaults(func=cmd_train_clip)

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
