"""``vqdiff train clip``: pretrain the text encoder contrastively on an image-caption folder.

The paper conditions on a pretrained CLIP text encoder, frozen. None can be downloaded here, and a
text encoder trained jointly with the transformer from nothing merges words the transformer has
not yet learned to use (on the shapes set: "left" / "right", "above" / "below"; docs/RESULTS.md).
This trains the same CLIPTextModel as CLIP is trained: a symmetric InfoNCE loss between the
caption's end-of-text state and a small image encoder's embedding, over the batch.

Bag-of-words captions match as well as the true ones under that loss, so ``swap`` adds hard
negatives, as NegCLIP does (Yuksekgonul et al. 2023): each caption that holds a word of a listed pair
("left:right") also appears with that word swapped, as one more wrong caption for its image.

OUT/text_encoder and OUT/tokenizer are the model folder's components (diffusers layout);
``vqdiff train transformer --text-encoder OUT [--freeze-text]`` builds on them. Resumable like every
trainer here (model/train/common.py).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm
from transformers import CLIPTextModel

from vqdiff.model.config import from_name
from vqdiff.model.train.data import ImageCaptionFolder, read_index
from vqdiff.model.io.folder import save_text_encoder
from vqdiff.model.net.text_encoder import TextEncoder, clip_config
from vqdiff.model.net.tokenizer import caption_tokenizer
from vqdiff.model.cli_args import add_fields, add_quiet, arg, from_args
from vqdiff.model.train.common import (PROBE_STEPS, JsonLog, TimeBudget, batch_indices, load_checkpoint, save_checkpoint,
                                       step_generator, warmup_cosine)

DEFAULT_SWAP = ("left:right", "above:below", "top:bottom")


@dataclass(frozen=True)
class CLIPTrainConfig:
    """A run's settings; each field is a flag of ``vqdiff train clip`` (``add_arguments``)."""

    data: str = arg(help="image-caption folder (see model/train/data.py)")
    out: str = arg(help="run folder: checkpoint.pt, train.log, text_encoder/, tokenizer/")
    preset: str = arg("shapes", "the text encoder's shape and the image size")
    steps: int = arg(3000, "optimiser steps")
    batch_size: int = arg(256, "image-caption pairs per step (the contrastive batch)")
    lr: float = arg(5e-4, "learning rate")
    warmup: int = arg(100, "steps of linear learning-rate warmup")
    weight_decay: float = arg(0.1, "AdamW weight decay")
    swap: tuple[str, ...] = arg(DEFAULT_SWAP, "comma-separated word pairs: a caption with one of them swapped is "
                                              "a hard negative ('' for none)", metavar="A:B,...")
    seed: int = arg(0, "the seed of the batch order and every draw")
    device: str = arg("cpu", "cpu | cuda | cuda:N (batches and negatives are drawn on the CPU either way)")
    precision: str = arg("fp32", "bf16: the forward under bf16 autocast; weights, optimizer and loss stay fp32",
                         choices=("fp32", "bf16"))
    time_budget_s: float | None = arg(None, "fit the run into this many seconds: after 50 timed steps it fixes "
                                            "--steps (at most the given value) so that the cosine ends in time")
    log_every: int = arg(50, "steps between train.log records")
    ckpt_every: int = arg(250, "steps between checkpoints")

    def __post_init__(self) -> None:
        object.__setattr__(self, "swap", tuple(self.swap))
        for pair in self.swap:
            if not re.fullmatch(r"[a-z0-9']+:[a-z0-9']+", pair) or len(set(pair.split(":"))) != 2:
                raise ValueError(f"swap: {pair!r} is not allowed; expected two different lowercase words as 'a:b'")
        if self.batch_size < 2:
            raise ValueError(f"batch_size: {self.batch_size} is not allowed; a contrastive batch needs >= 2")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision: {self.precision!r} is not allowed; expected 'fp32' or 'bf16'")
        if self.time_budget_s is not None and not (self.time_budget_s > 0 and math.isfinite(self.time_budget_s)):
            raise ValueError(f"time_budget_s: {self.time_budget_s} is not allowed; expected a number of seconds > 0")


def swapped(caption: str, pairs: tuple[str, ...], pick: float) -> str | None:
    """``caption`` with one word of a listed pair replaced by its partner (the occurrence chosen by
    ``pick`` in [0, 1)); None when no listed word occurs. Word boundaries are respected."""
    partner = {}
    for pair in pairs:
        a, b = pair.split(":")
        partner[a], partner[b] = b, a
    words = caption.split(" ")
    spots = [i for i, w in enumerate(words) if w.rstrip(",").lower() in partner]
    if not spots:
        return None
    i = spots[int(pick * len(spots))]
    w = words[i]
    core = w.rstrip(",")
    words[i] = partner[core.lower()] + w[len(core):]
    return " ".join(words)


class ImageEncoder(nn.Module):
    """(B, 3, S, S) in [0, 1] -> (B, D) embedding: three stride-2 convs, flattened and projected
    (not pooled: where an object is must survive, or places could not be matched)."""

    def __init__(self, image_size: int, dim: int, width: int = 64):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, 2, 1), nn.GELU(),
        )
        side = math.ceil(image_size / 8)
        self.proj = nn.Linear(2 * width * side * side, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.convs(x * 2 - 1).flatten(1))  # (B, D)


class CLIPPair(nn.Module):
    def __init__(self, text_encoder: TextEncoder, image_size: int):
        super().__init__()
        d = text_encoder.dim
        self.text_encoder = text_encoder
        self.text_proj = nn.Linear(d, d, bias=False)
        self.image_encoder = ImageEncoder(image_size, d)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_text(self, ids: Tensor) -> Tensor:
        """(B, L) ids -> (B, D). The pooled state is the first end-of-text token's; attention is causal,
        so the padding after the batch's longest caption cannot reach it and is cut (exact)."""
        eos = self.text_encoder.tokenizer.eos_token_id
        n = int((ids == eos).int().argmax(1).max()) + 1
        pooled = self.text_encoder.clip(input_ids=ids[:, :n]).pooler_output  # (B, D)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def embed_images(self, images: Tensor) -> Tensor:
        return F.normalize(self.image_encoder(images), dim=-1)  # (B, D)


def clip_loss(pair: CLIPPair, images: Tensor, ids: Tensor, neg_ids: Tensor, neg_of: Tensor) -> tuple[Tensor, dict]:
    """Symmetric InfoNCE over the batch; the hard negatives (neg_ids (M, L), swapped captions of the
    images neg_of (M,)) are extra wrong captions in the image-to-text direction."""
    b = images.shape[0]
    img = pair.embed_images(images)  # (B, D)
    txt = pair.embed_text(torch.cat([ids, neg_ids]))  # (B + M, D)
    scale = pair.logit_scale.clamp(max=math.log(100)).exp()
    logits = (scale * img @ txt.T).float()  # (B, B + M)
    target = torch.arange(b, device=logits.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :b].T, target)) / 2
    with torch.no_grad():
        stats = {"retrieval": (logits[:, :b].argmax(1) == target).float().mean()}
        if neg_of.numel():
            neg_of = neg_of.to(logits.device)
            own = logits[neg_of, neg_of]  # (M,)
            stats["beats_swap"] = (own > logits[neg_of, b + torch.arange(neg_of.numel(), device=logits.device)]).float().mean()
    return loss, stats  # the stats are 0-d tensors on the device: read them only when logging


def load_images(data: ImageCaptionFolder) -> Tensor:
    """Every image once, (n, 3, S, S) uint8 (60k images at 32 px: 184 MB)."""
    return torch.stack([(data[i][0] * 255).round().to(torch.uint8) for i in range(len(data))])


def build(cfg: CLIPTrainConfig, captions: list[str]) -> CLIPPair:
    config = from_name(cfg.preset)
    tokenizer, c = caption_tokenizer(config.text_encoder, captions)
    torch.manual_seed(cfg.seed)
    return CLIPPair(TextEncoder(tokenizer, CLIPTextModel(clip_config(c, tokenizer))), config.image_size)


def train_clip(cfg: CLIPTrainConfig, progress: bool = True) -> Path:
    t_start = time.time()  # a time budget counts from here: loading is in it
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path)
    if ckpt is not None and ckpt["train_config"]["data"] != cfg.data:
        raise ValueError(f"{ckpt_path}: was trained on {ckpt['train_config']['data']}, not {cfg.data}; use a new --out")
    captions = [c for _, c in read_index(Path(cfg.data))]
    if len(captions) < cfg.batch_size:
        raise ValueError(f"{cfg.data}: {len(captions)} images, fewer than batch_size {cfg.batch_size}")
    pair = build(cfg, captions)
    data = ImageCaptionFolder(cfg.data, from_name(cfg.preset).image_size, cache=False)
    device = torch.device(cfg.device)
    images = load_images(data).to(device)  # (n, 3, S, S) uint8
    ids = pair.text_encoder.tokenize(captions).to(device)  # (n, L)
    pair.to(device)

    opt = torch.optim.AdamW(pair.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.warmup, cfg.steps, 0.0))  # cosine to 0
    step, planned = 0, None
    if ckpt is not None:
        pair.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        step = ckpt["step"]
        if ckpt.get("planned_steps") is not None and cfg.time_budget_s is None:
            planned = ckpt["planned_steps"]  # the length an interrupted budgeted run had fixed
            cfg = replace(cfg, steps=planned)

    log = JsonLog(out / "train.log")
    pair.train()
    t0 = time.time()
    budget = TimeBudget(cfg.time_budget_s, t_start, step, PROBE_STEPS)
    bar = tqdm(total=cfg.steps, initial=step, desc="train clip", unit="step", disable=not progress)
    while step < cfg.steps:
        g = step_generator(cfg.seed, step)
        idx = batch_indices(len(captions), cfg.batch_size, cfg.seed, step)  # (B,)
        picks = torch.rand(idx.numel(), generator=g).tolist()
        negs = [(k, swapped(captions[i], cfg.swap, p)) for k, (i, p) in enumerate(zip(idx.tolist(), picks))]
        negs = [(k, s) for k, s in negs if s is not None]
        neg_of = torch.tensor([k for k, _ in negs], dtype=torch.long)  # (M,)
        neg_ids = pair.text_encoder.tokenize([s for _, s in negs]).to(device) if negs else ids[:0]  # (M, L)
        idx = idx.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss, stats = clip_loss(pair, images[idx].float() / 255, ids[idx], neg_ids, neg_of)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(pair.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        plan = budget.plan(step, cfg.steps, time.time())
        if plan is not None:
            planned = plan
            cfg = replace(cfg, steps=planned)  # the schedule reads cfg.steps: the cosine now ends at `planned`
            bar.total = planned
            log.write({"step": step, "planned_steps": planned, "time_budget_s": cfg.time_budget_s,
                       "elapsed_s": round(time.time() - t0, 1)})
        over = budget.over(time.time())
        if step % cfg.log_every == 0 or step == cfg.steps or over:
            rec = {"step": step, "loss": round(loss.item(), 5), **{k: round(v.item(), 4) for k, v in stats.items()},
                   "lr": sched.get_last_lr()[0], "elapsed_s": round(time.time() - t0, 1)}
            log.write(rec)
            bar.set_postfix(loss=rec["loss"], retrieval=rec["retrieval"])
        if step % cfg.ckpt_every == 0 or step == cfg.steps or over:
            save_text_encoder(pair.text_encoder, out)
            save_checkpoint({"step": step, "model": pair.state_dict(), "opt": opt.state_dict(),
                             "sched": sched.state_dict(), "planned_steps": planned, "train_config": asdict(cfg)},
                            ckpt_path)
        if over and step < cfg.steps:
            log.write({"step": step, "stopped": "time budget spent", "elapsed_s": round(time.time() - t0, 1)})
            break
    bar.close()
    log.close()
    return out


def add_arguments(parser) -> None:
    """``vqdiff train clip``: one flag per ``CLIPTrainConfig`` field, and --quiet."""
    add_fields(parser, CLIPTrainConfig)
    add_quiet(parser)
    parser.set_defaults(func=run)


def run(args) -> None:
    print(train_clip(from_args(CLIPTrainConfig, args), progress=not args.quiet))
