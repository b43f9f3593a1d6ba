"""``vqdiff train transformer`` and ``vqdiff train null-cond``: the diffusion transformer on an
image-caption folder, with the caption dropped to the null condition at a rate (0.1 by default).

A fresh run builds a model from a preset: a word-level CLIP tokenizer over the captions' words, a
CLIP text encoder trained jointly (no pretrained CLIP can be downloaded here), and a VQVAE trained
by ``vqdiff train vqvae``. ``text_encoder`` swaps in one pretrained by ``vqdiff train clip`` (fresh
or ``--init`` runs), and ``freeze_text`` keeps it fixed, as the paper keeps CLIP. ``--init MODEL``
continues from a model folder instead: that is the paper's fine-tuning step (``null-cond``),
optionally training only the learnable null.

``teacher`` keeps a fine-tune close to another model (usually its start) where that model is right:
the loss adds ``teacher_weight`` x KL(teacher || model) of the x0 predictions for every sample whose
caption does not match ``teacher_skip`` and is not dropped (``teacher_on_null``: dropped ones too),
the teacher reading the caption with its own text encoder, or its own null (learning without
forgetting, as a per-token term like the loss).

``summary_drop`` hides, at a rate, the states that summarise a caption (its end-of-text token's
and the padding's) behind the empty prompt's: the model learns to read each word where it stands
(a colour at its colour word, a shape at its shape word) as well as from the summary, a way to
factor attributes that keeps the text encoder and the transformer as they are.

What the caption is dropped to (``null_mode``): ``learnable`` (the learnable null condition, Eq. 7),
``empty`` (the empty prompt's embedding: "guidance with a null text"), or ``none`` (never dropped).

Resumable like every trainer here (model/train/common.py); OUT/model/ is a complete model folder,
rewritten at every checkpoint, so a stopped run still leaves a usable model. Where checkpoint.pt is
gone but OUT/model/ and OUT/progress.json are there (a run carried to another machine with its weights
alone), the run resumes from them: the same step, batches, draws and importance statistics, the
optimizer's moments started afresh under a linear re-warm of the learning rate over ``REWARM_STEPS``.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from vqdiff.model.config import from_name
from vqdiff.model.train.data import ImageCaptionFolder, read_index
from vqdiff.model.diffusion import Schedule, q_sample
from vqdiff.model.io.folder import ModelFolderError, load_into, load_model, load_text_encoder, load_vqvae, random_model, save_model
from vqdiff.model.net.null_cond import NullCondition
from vqdiff.model.net.pipeline import VQDiffusion
from vqdiff.model.net.text_encoder import text_encoder_config
from vqdiff.model.net.tokenizer import caption_tokenizer
from vqdiff.model.cli_args import add_fields, add_quiet, arg, from_args, help_of
from vqdiff.model.train.common import (PROBE_STEPS, JsonLog, TimeBudget, batch_indices, load_checkpoint, load_progress,
                                       save_checkpoint, save_progress, step_generator, warmup_cosine)
from vqdiff.model.train.loss import ImportanceSampler, categorical_kl, training_loss

NULL_MODES = ("learnable", "empty", "none")
# `vqdiff train null-cond`: a short fine-tuning run of a trained model, not a run from scratch
NULL_COND_DEFAULTS = {"steps": 1000, "lr": 1e-4, "warmup": 50}
# a weights-only resume starts AdamW's moments at zero: its first updates are sign-like, so the
# learning rate climbs back to the schedule's over these steps
REWARM_STEPS = 100


@dataclass(frozen=True)
class TransformerTrainConfig:
    """A run's settings; each field is a flag of ``vqdiff train transformer`` / ``null-cond``
    (``add_arguments``)."""

    data: str = arg(help="image-caption folder (see model/train/data.py)")
    out: str = arg(help="run folder: checkpoint.pt, train.log, tokens.pt, model/")
    vqvae: str | None = arg(None, "OUT/vqvae of `vqdiff train vqvae` (a fresh model)")
    init: str | None = arg(None, "a model folder to continue training")
    preset: str = arg("shapes", "the model preset (the shape of a fresh model)")
    steps: int = arg(5000, "optimiser steps")
    batch_size: int = arg(64, "images per step")
    lr: float = arg(5e-4, "learning rate")
    warmup: int = arg(200, "steps of linear learning-rate warmup")
    min_lr: float | None = arg(None, "cosine-decay the learning rate to this at --steps (none: constant after the warmup)")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    null_drop: float = arg(0.1, "rate at which a caption becomes the null condition")
    null_mode: str = arg("learnable", f"what a dropped caption becomes: {' | '.join(NULL_MODES)}")
    only_null: bool = arg(False, "train only the learnable null (the rest frozen)")
    text_encoder: str | None = arg(None, "use this text encoder and tokenizer (OUT of `vqdiff train clip`, or a model folder)")
    freeze_text: bool = arg(False, "keep the text encoder fixed, as the paper keeps CLIP")
    train_only: str | None = arg(None, "a regular expression: of the parameters the run would train, train only those "
                                       "whose names it matches (re.search over the model's names, e.g. "
                                       "'attn2\\.to_[kv]\\.' for the cross-attention's keys and values); the rest fixed")
    aux_weight: float | None = arg(None, "weight of the auxiliary x0 cross-entropy beside the KL (none: the preset's, "
                                         "as released; larger weights favour the noisiest steps)")
    precision: str = arg("fp32", "bf16: the forward under bf16 autocast; weights, optimizer and loss stay fp32 "
                                 "(what it gains where: docs/BENCHMARKS.md, training)", choices=("fp32", "bf16"))
    device: str = arg("cpu", "cpu | cuda | cuda:N (batches are drawn on the CPU either way: the same draws)")
    time_budget_s: float | None = arg(None, "fit the run into this many seconds: after 50 timed steps it fixes "
                                            "--steps (at most the given value) so that the cosine tail ends in time")
    log_every: int = arg(50, "steps between train.log records")
    ckpt_every: int = arg(250, "steps between checkpoints (OUT/model/ is rewritten at each)")
    keep_snapshots: bool = arg(False, "also write each checkpoint's model to OUT/snapshots/STEP/ and keep it "
                                      "(the folders `vqdiff convert --average` averages)")
    seed: int = arg(0, "the seed of the batch order and every draw")
    teacher: str | None = arg(None, "a model folder whose x0 predictions the run keeps to on captioned samples: "
                                    "the loss adds teacher_weight x KL(teacher || model) (learning without forgetting)")
    teacher_weight: float = arg(1.0, "weight of the teacher's KL term, per token as the loss is")
    teacher_skip: str | None = arg(None, "a regular expression: captions it matches (re.search) get no teacher term, "
                                         "e.g. the ones whose images the teacher cannot know")
    teacher_on_null: bool = arg(False, "the teacher's term also on samples dropped to the null condition (the "
                                       "unconditional branch guidance extrapolates from), the teacher given its own")
    summary_drop: float = arg(0.0, "rate at which a caption's summary states (its end-of-text token's and the padding's, "
                                   "which under causal attention have read the whole caption) become the empty "
                                   "prompt's at the same places: the model must then read each word where it stands")

    def __post_init__(self) -> None:
        if self.null_mode not in NULL_MODES:
            raise ValueError(f"null_mode: {self.null_mode!r} is not allowed; expected one of {list(NULL_MODES)}")
        for name in ("null_drop", "summary_drop"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name}: {rate} is not allowed; expected a number in [0, 1]")
        if (self.vqvae is None) == (self.init is None):
            raise ValueError("give exactly one of vqvae (a fresh model) and init (a model folder to continue)")
        if self.min_lr is not None and not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr: {self.min_lr} is not allowed; expected a number in [0, lr={self.lr}]")
        if self.aux_weight is not None and not (self.aux_weight >= 0.0 and math.isfinite(self.aux_weight)):
            raise ValueError(f"aux_weight: {self.aux_weight} is not allowed; expected a finite number >= 0")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision: {self.precision!r} is not allowed; expected 'fp32' or 'bf16'")
        if self.time_budget_s is not None and not (self.time_budget_s > 0 and math.isfinite(self.time_budget_s)):
            raise ValueError(f"time_budget_s: {self.time_budget_s} is not allowed; expected a number of seconds > 0")
        if self.only_null and self.null_mode != "learnable":
            raise ValueError("only_null trains the learnable null: it needs null_mode 'learnable'")
        if not (self.teacher_weight >= 0.0 and math.isfinite(self.teacher_weight)):
            raise ValueError(f"teacher_weight: {self.teacher_weight} is not allowed; expected a finite number >= 0")
        if self.teacher is None and (self.teacher_skip is not None or self.teacher_on_null):
            raise ValueError("teacher_skip and teacher_on_null choose the samples of a teacher's term: they need teacher")
        for name in ("train_only", "teacher_skip"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"{name}: {pattern!r} is not a regular expression ({e})") from None


def lr_factor(cfg: TransformerTrainConfig, step: int, rewarm_from: int | None = None) -> float:
    """Learning rate / cfg.lr at ``step``: linear warmup, then constant or cosine down to min_lr;
    after a weights-only resume at ``rewarm_from``, times a linear ramp over ``REWARM_STEPS``."""
    f = warmup_cosine(step, cfg.warmup, cfg.steps, None if cfg.min_lr is None else cfg.min_lr / cfg.lr)
    return f if rewarm_from is None else f * min(1.0, (step - rewarm_from + 1) / REWARM_STEPS)


@torch.no_grad()
def add_null_cond(model: VQDiffusion) -> VQDiffusion:
    """The same model with a learnable null condition, started at the empty prompt's embedding (so the
    fine-tune starts from "guidance with a null text" and learns away from it)."""
    c = model.config.text_encoder
    null = NullCondition(c.max_length, c.hidden_size)
    null.embeddings.copy_(model.text_encoder.encode([""])[0])  # (L, D)
    out = VQDiffusion(replace(model.config, learnable_null=True), model.transformer, model.vqvae, model.text_encoder, null)
    out.generation_defaults = model.generation_defaults
    return out


def with_text_encoder(model: VQDiffusion, folder: str) -> VQDiffusion:
    """``model`` conditioned on the text encoder (and tokenizer) of ``folder`` instead of its own."""
    te = load_text_encoder(folder)
    c = model.config
    if te.dim != c.transformer.text_dim:
        raise ModelFolderError(f"{folder}: its text encoder is {te.dim} wide; the transformer reads {c.transformer.text_dim}")
    null = model.null_cond
    if null is not None and tuple(null.embeddings.shape) != (te.max_length, te.dim):
        null = NullCondition(te.max_length, te.dim)  # the old null lived in another text space: start it afresh
    out = VQDiffusion(replace(c, text_encoder=text_encoder_config(te.clip.config)), model.transformer, model.vqvae, te, null)
    out.generation_defaults = model.generation_defaults
    return out


def without_summary(text: torch.Tensor, ids: torch.Tensor, eos_id: int, empty: torch.Tensor) -> torch.Tensor:
    """``text`` (B, L, D) with every state from the first end-of-text token of ``ids`` (B, L) on
    replaced by ``empty``'s (1, L, D) at the same place: what is left of the caption is its words'
    states, each of which (causal attention) has read only the words before it."""
    summary = ((ids == eos_id).cumsum(1) > 0).to(text.device)  # (B, L) bool
    return torch.where(summary.unsqueeze(-1), empty, text)  # (B, L, D)


def build_model(cfg: TransformerTrainConfig, captions: list[str]) -> VQDiffusion:
    if cfg.init is not None:
        model = load_model(cfg.init)
        if cfg.text_encoder is not None:
            model = with_text_encoder(model, cfg.text_encoder)
        if cfg.null_mode == "learnable" and model.null_cond is None:
            model = add_null_cond(model)  # the paper's fine-tuning of a base trained without one
        return model
    vq_dir = Path(cfg.vqvae)
    config = from_name(cfg.preset)
    vqvae = load_vqvae(vq_dir)
    vq_config = vqvae.config
    if vq_config.num_vq_embeddings != config.vqvae.num_vq_embeddings or vq_config.downsample != config.vqvae.downsample:
        raise ModelFolderError(f"{vq_dir}: its VQVAE does not fit preset {cfg.preset!r} (codebook size or downsampling)")
    tokenizer, text_config = caption_tokenizer(config.text_encoder, captions)
    config = replace(config, vqvae=vq_config, learnable_null=cfg.null_mode == "learnable", text_encoder=text_config)
    model = random_model(config, tokenizer, seed=cfg.seed)
    load_into(model.vqvae, vqvae.state_dict(), str(vq_dir))
    return model if cfg.text_encoder is None else with_text_encoder(model, cfg.text_encoder)


@torch.no_grad()
def tokenize_dataset(model: VQDiffusion, data: ImageCaptionFolder, batch: int = 256) -> torch.Tensor:
    """Every image's token grid, once: (n, N) long. The VQVAE is frozen while the transformer trains."""
    model.vqvae.eval()
    device = next(model.vqvae.parameters()).device
    out = []
    for i in range(0, len(data), batch):
        images = torch.stack([data[j][0] for j in range(i, min(i + batch, len(data)))])  # (b, 3, H, W)
        out.append(model.vqvae.tokenize(images.to(device)).cpu())
    return torch.cat(out)  # (n, N)


def _tokens_key(model: VQDiffusion, data: ImageCaptionFolder) -> str:
    """Names what the tokens depend on: each image file (path, size, mtime) and the VQVAE's weights."""
    h = hashlib.sha256()
    for path, _ in data.pairs:
        st = path.stat()
        h.update(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for name, tensor in sorted(model.vqvae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cached_tokens(model: VQDiffusion, data: ImageCaptionFolder, path: Path) -> torch.Tensor:
    """``tokenize_dataset``, kept at ``path`` (the run folder): a resumed run does not encode every
    image again (minutes for 60k images on 2 cores). The file is used only if it was made from the same
    image files and the same VQVAE weights; otherwise it is rebuilt."""
    key = _tokens_key(model, data)
    saved = load_checkpoint(path)
    if saved is not None and saved.get("key") == key:
        return saved["tokens"]
    tokens = tokenize_dataset(model, data)  # (n, N)
    save_checkpoint({"key": key, "tokens": tokens}, path)
    return tokens


def load_teacher(folder: str, model: VQDiffusion, device: torch.device) -> VQDiffusion:
    """The frozen model of ``--teacher``: it must predict x0 over the same tokens under the same
    schedule as the model trained (its text encoder may differ: it reads the captions its own way)."""
    teacher = load_model(folder)
    mine, theirs = model.config, teacher.config
    for name, a, b in (("codebook size", mine.transformer.num_embed, theirs.transformer.num_embed),
                       ("tokens per image", mine.transformer.num_tokens, theirs.transformer.num_tokens),
                       ("diffusion schedule", replace(mine.diffusion, auxiliary_loss_weight=0.0),
                        replace(theirs.diffusion, auxiliary_loss_weight=0.0))):
        if a != b:
            raise ModelFolderError(f"{folder}: the teacher's {name} is {b}; the model trained has {a}")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).eval()


def train_transformer(cfg: TransformerTrainConfig, progress: bool = True) -> Path:
    t_start = time.time()  # a time budget counts from here: loading and tokenizing are in it
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    progress_path = out / "progress.json"
    ckpt = load_checkpoint(ckpt_path)
    # without checkpoint.pt: the weights-only state (OUT/model/ and the run's position)
    light = load_progress(progress_path) if ckpt is None and (out / "model").is_dir() else None
    captions = [c for _, c in read_index(Path(cfg.data))]
    # a resumed run rebuilds the architecture (and tokenizer) from its own model folder
    resumed = replace(cfg, init=str(out / "model"), vqvae=None, text_encoder=None)  # the run folder holds everything
    model = build_model(resumed if ckpt is not None or light is not None else cfg, captions)
    device = torch.device(cfg.device)
    data = ImageCaptionFolder(cfg.data, model.config.image_size, cache=False)
    if len(data) < cfg.batch_size:
        raise ValueError(f"{cfg.data}: {len(data)} images, fewer than batch_size {cfg.batch_size}")
    model.to(device)
    tokens = cached_tokens(model, data, out / "tokens.pt")  # (n, N), on the CPU
    ids = model.text_encoder.tokenize(captions)  # (n, L)
    empty_ids = model.text_encoder.tokenize([""])  # (1, L)
    eos_id = model.text_encoder.tokenizer.eos_token_id
    teacher = None if cfg.teacher is None else load_teacher(cfg.teacher, model, device)
    if teacher is not None:
        teacher_ids = teacher.text_encoder.tokenize(captions)  # (n, L'): the teacher's own tokenizer
        teacher_empty = None if teacher.null_cond is not None else teacher.text_encoder.tokenize([""]).to(device)  # (1, L')
        skip = None if cfg.teacher_skip is None else re.compile(cfg.teacher_skip)
        taught = torch.tensor([skip is None or skip.search(cap) is None for cap in captions])  # (n,) bool

    text_trains = not (cfg.only_null or cfg.freeze_text)
    trainable = [model.null_cond] if cfg.only_null else [
        m for m in (model.transformer, model.text_encoder if text_trains else None, model.null_cond) if m is not None]
    params = [p for m in trainable for p in m.parameters()]
    if cfg.train_only is not None:
        chosen, pattern = {id(p) for p in params}, re.compile(cfg.train_only)
        params = [p for n, p in model.named_parameters() if id(p) in chosen and pattern.search(n)]
        if not params:
            raise ValueError(f"train_only: {cfg.train_only!r} matches no parameter the run would train")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    importance = ImportanceSampler(model.config.diffusion.num_timesteps)
    step, planned, rewarm_from = 0, None, None
    state = ckpt if ckpt is not None else light
    if state is not None:
        trained_on = ckpt["train_config"]["data"] if ckpt is not None else light["data"]
        if trained_on != cfg.data:
            where = ckpt_path if ckpt is not None else progress_path
            raise ValueError(f"{where}: was trained on {trained_on}, not {cfg.data}; use a new --out")
        step, rewarm_from = state["step"], state.get("rewarm_from")
        if state.get("planned_steps") is not None and cfg.time_budget_s is None:
            planned = state["planned_steps"]  # the length an interrupted budgeted run had fixed
            cfg = replace(cfg, steps=planned)
    if light is not None:  # the weights came with OUT/model/; AdamW's moments start at zero
        rewarm_from = step
        for group in opt.param_groups:
            group["initial_lr"] = cfg.lr  # what LambdaLR sets at step 0
    # the learning rate is a function of the step: a weights-only resume starts the schedule there
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s, rewarm_from),
                                              last_epoch=step - 1 if light is not None else -1)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        importance.load_state_dict(ckpt["importance"])
    elif light is not None:
        importance.load_state_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in light["importance"].items()})

    # x_t is drawn on the CPU from the step's generator, so every device sees the same batches
    cpu_schedule, schedule, c = Schedule(model.config.diffusion), model.schedule, model.config.transformer

    def autocast():  # the forward passes under --precision
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    log = JsonLog(out / "train.log")
    if light is not None:
        log.write({"step": step, "resumed": f"weights only: AdamW's moments afresh, the lr re-warmed over {REWARM_STEPS} steps"})
    model.train()
    model.vqvae.eval()
    t0, seen = time.time(), 0.0
    budget = TimeBudget(cfg.time_budget_s, t_start, step, PROBE_STEPS)
    bar = tqdm(total=cfg.steps, initial=step, desc="train transformer", unit="step", disable=not progress)
    while step < cfg.steps:
        g = step_generator(cfg.seed, step)
        idx = batch_indices(len(data), cfg.batch_size, cfg.seed, step)
        b = idx.numel()
        x0 = tokens[idx]  # (B, N)
        t, pt = importance.sample(b, g)  # (B,), (B,)
        x_t = q_sample(cpu_schedule, x0, t, generator=g)  # (B, N)
        drop = torch.rand(b, generator=g) < (cfg.null_drop if cfg.null_mode != "none" else 0.0)  # (B,)
        # drawn only when asked for, so runs without it keep their draws
        blind = torch.rand(b, generator=g) < cfg.summary_drop if cfg.summary_drop > 0 else None  # (B,)
        keep = None  # (B,): the samples of the teacher's term
        if teacher is not None:
            keep = taught[idx] if cfg.teacher_on_null else taught[idx] & ~drop
        x0, x_t, t_dev, pt, drop = (v.to(device, non_blocking=True) for v in (x0, x_t, t, pt, drop))
        with autocast():
            with torch.set_grad_enabled(text_trains):
                text = model.text_encoder(ids[idx].to(device))  # (B, L, D)
                hide = blind is not None and bool(blind.any())
                # the empty prompt's states, once a step: the hidden summaries' and the null text's
                empty = model.text_encoder(empty_ids.to(device)) if hide or cfg.null_mode != "learnable" else None  # (1, L, D)
                if hide:
                    cut = without_summary(text, ids[idx], eos_id, empty)  # (B, L, D)
                    text = torch.where(blind.to(device).view(-1, 1, 1), cut, text)  # (B, L, D)
            null = model.null_cond(b) if cfg.null_mode == "learnable" else empty.expand(b, -1, -1)  # (B, L, D)
            cond = torch.where(drop.view(-1, 1, 1), null, text)  # (B, L, D)
            log_x0 = model.transformer.log_probs(x_t, t_dev, cond)  # (B, N, K) fp32
        loss_b, terms = training_loss(schedule, log_x0, x0, x_t, t_dev, pt=pt, return_terms=True,
                                      auxiliary_loss_weight=cfg.aux_weight)  # (B,)
        loss = loss_b.sum() / (b * c.num_tokens)
        kl = None
        if keep is not None and keep.any():
            with torch.no_grad(), autocast():
                k = keep.to(device)
                cond_t = teacher.text_encoder(teacher_ids[idx][keep].to(device))  # (B', L', D')
                dropped = drop[k]  # (B',), on the device
                if dropped.any():  # the teacher's own null: its learnable one, else its empty prompt
                    null_t = (teacher.null_cond(cond_t.shape[0]) if teacher.null_cond is not None
                              else teacher.text_encoder(teacher_empty).expand(cond_t.shape[0], -1, -1))
                    cond_t = torch.where(dropped.view(-1, 1, 1), null_t, cond_t)
                log_x0_teacher = teacher.transformer.log_probs(x_t[k], t_dev[k], cond_t)  # (B', N, K) fp32
            kl = categorical_kl(log_x0_teacher, log_x0[k])  # (B',): KL(teacher || model)
            loss = loss + cfg.teacher_weight * kl.sum() / (b * c.num_tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        importance.update(t, terms.vb.detach().cpu())
        step += 1
        seen += b
        bar.update(1)
        plan = budget.plan(step, cfg.steps, time.time())
        if plan is not None:
            planned = plan
            cfg = replace(cfg, steps=planned)  # lr_factor reads cfg.steps: the cosine now ends at `planned`
            bar.total = planned
            log.write({"step": step, "planned_steps": planned, "time_budget_s": cfg.time_budget_s,
                       "elapsed_s": round(time.time() - t0, 1)})
        over = budget.over(time.time())
        if step % cfg.log_every == 0 or step == cfg.steps or over:
            with torch.no_grad():
                masked = x_t == c.mask_id
                acc = (log_x0.argmax(-1) == x0)[masked].float().mean().item() if masked.any() else float("nan")
            rec = {"step": step, "loss": round(loss.item(), 5), "masked_acc": round(acc, 4),
                   "lr": sched.get_last_lr()[0], "elapsed_s": round(time.time() - t0, 1)}
            if kl is not None:  # per token, over the samples of the teacher's term
                rec["teacher_kl"] = round(kl.detach().mean().item() / c.num_tokens, 5)
            log.write(rec)
            bar.set_postfix(loss=rec["loss"], acc=rec["masked_acc"])
        if step % cfg.ckpt_every == 0 or step == cfg.steps or over:
            save_model(model.eval(), out / "model", overwrite=True)
            if cfg.keep_snapshots:
                save_model(model, out / "snapshots" / str(step), overwrite=True)
            model.train()
            model.vqvae.eval()
            save_checkpoint({"step": step, "model": model.state_dict(), "opt": opt.state_dict(),
                             "sched": sched.state_dict(), "importance": importance.state_dict(),
                             "planned_steps": planned, "rewarm_from": rewarm_from, "train_config": asdict(cfg)}, ckpt_path)
            save_progress({"step": step, "planned_steps": planned, "rewarm_from": rewarm_from, "data": cfg.data,
                           "importance": {k: v.tolist() for k, v in importance.state_dict().items()}}, progress_path)
        if over and step < cfg.steps:
            log.write({"step": step, "stopped": "time budget spent", "elapsed_s": round(time.time() - t0, 1)})
            break
    bar.close()
    log.close()
    return out / "model"


def add_arguments(parser) -> None:
    """``vqdiff train transformer``: one flag per ``TransformerTrainConfig`` field but only_null, and
    --quiet; exactly one of --vqvae (a fresh model) and --init (a model folder)."""
    c = TransformerTrainConfig
    add_fields(parser, c, skip=("vqvae", "init", "only_null"))
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--vqvae", help=help_of(c, "vqvae"))
    start.add_argument("--init", help=help_of(c, "init"))
    add_quiet(parser)
    parser.set_defaults(func=run)


def add_null_cond_arguments(parser) -> None:
    """``vqdiff train null-cond``: the fields as flags, with ``NULL_COND_DEFAULTS``; --model, the
    folder to fine-tune."""
    add_fields(parser, TransformerTrainConfig, skip=("vqvae", "init"), defaults=NULL_COND_DEFAULTS)
    parser.add_argument("--model", dest="init", metavar="MODEL", required=True, help="the model folder to fine-tune")
    add_quiet(parser)
    parser.set_defaults(func=run)


def run(args) -> None:
    print(train_transformer(from_args(TransformerTrainConfig, args), progress=not args.quiet))
