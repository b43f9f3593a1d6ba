"""``vqdiff train vqvae``: train the image tokeniser on an image-caption folder (captions unused).

Resumable: every ``ckpt_every`` steps the full state (weights, optimiser, EMA codebook statistics,
step) goes to OUT/checkpoint.pt atomically, and a run pointed at the same OUT continues from it
with the same batch order. At the end OUT/vqvae/ holds the component in the model-folder layout
(config.json + diffusion_pytorch_model.safetensors) that ``vqdiff train transformer`` builds on.

The training pieces of the tokeniser live here too, beside the network of model/net/vqvae.py: the
identical-patch loss, the training pass with its EMA codebook updates and code restarts.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vqdiff.model.config import VQVAEConfig, from_name
from vqdiff.model.train.data import ImageCaptionFolder
from vqdiff.model.io.folder import save_component, vqvae_config_to_diffusers
from vqdiff.model.cli_args import add_fields, add_quiet, arg, from_args
from vqdiff.model.train.common import JsonLog, batch_indices, load_checkpoint, save_checkpoint, step_generator
from vqdiff.model.net.vqvae import VQVAE, VQVAEOutput


def identical_patch_loss(images: torch.Tensor, z_e: torch.Tensor) -> torch.Tensor:
    """Tie the latents of pixel-identical patches: mean squared distance of each latent to the mean
    latent of its group, over groups of at least two patches of this batch with the same 8-bit pixels,
    over the variance of all the batch's latents (so the encoder cannot lower it by shrinking z:
    unnormalised, weight 1 collapsed a shapes run to 2 codes in 50 steps).

    images (B, 3, H, W) in [0, 1]; z_e (B, D, h, w), one latent per f x f patch (f = H / h). An
    encoder sees the whole image (GroupNorm statistics, receptive fields, attention), so the same
    plain-background patch gets a different latent in every image, and a codebook spends hundreds of
    codes on one colour (seen on the shapes data: 468 of 512 codes for white). This term makes the
    latent a function of the patch where the patches are the same, and costs nothing elsewhere.
    Returns 0 (with a graph) when no two patches are identical.
    """
    b, d, h, w = z_e.shape
    f = images.shape[-1] // w
    if images.shape[-2] != h * f or images.shape[-1] != w * f:
        raise ValueError(f"identical_patch_loss: images {tuple(images.shape)} do not tile into the {h}x{w} latents")
    pix = (images.detach() * 255).round().to(torch.uint8)  # (B, 3, H, W)
    patches = pix.unfold(2, f, f).unfold(3, f, f).permute(0, 2, 3, 1, 4, 5).reshape(b * h * w, -1)  # (BHW, 3ff)
    _, group = torch.unique(patches, dim=0, return_inverse=True)  # (BHW,)
    count = torch.bincount(group)  # (G,)
    flat = z_e.permute(0, 2, 3, 1).reshape(b * h * w, d)  # (BHW, D)
    mean = torch.zeros(count.numel(), d, dtype=flat.dtype, device=flat.device).index_add_(0, group, flat)
    mean = mean / count.unsqueeze(1).to(flat.dtype)  # (G, D)
    tied = count[group] > 1  # (BHW,)
    if not bool(tied.any()):
        return flat.sum() * 0.0
    spread = (flat - flat.mean(0)).pow(2).mean()  # the batch's latent variance: shrinking z cannot pay
    return (flat[tied] - mean[group[tied]]).pow(2).mean() / (spread + 1e-8)


def training_pass(
    vqvae: VQVAE, images: torch.Tensor, ema_decay: float | None = None, restart_below: float | None = None,
    generator: torch.Generator | None = None, restart_by_error: bool = False,
) -> VQVAEOutput:
    """Training pass: reconstruction (B, 3, H, W) in [0, 1], tokens (B, h*w), vq_loss (scalar) and
    the encoder's latents z_e (B, D, h, w).

    With ``ema_decay`` set (training mode only), the codebook follows an exponential moving average
    of the encoder outputs assigned to each code instead of its gradient, and vq_loss is the
    commitment term alone; with ``restart_below`` too, rarely used codes are moved onto this
    batch's latents (``restart_codes``): chosen uniformly, or with ``restart_by_error`` in
    proportion to their squared distance from their code (k-means++'s D^2 rule), so that restarts
    go where the codebook fits the data worst rather than where the data is most common.
    Without ``ema_decay`` it is ``vqvae(images)``.
    """
    z_e = vqvae.encode(images)  # (B, D, h, w)
    z_q, tokens, loss = vqvae.quantize_latents(z_e)
    if ema_decay is not None and vqvae.training:
        ema_update(vqvae, z_e.detach(), tokens, ema_decay)
        if restart_below:
            err = (z_e - z_q).detach().pow(2).sum(1).flatten() if restart_by_error else None  # (BHW,)
            restart_codes(vqvae, z_e, restart_below, generator, weights=err)
        loss = vqvae.config.commitment_beta * F.mse_loss(z_e, z_q.detach())
    return VQVAEOutput(vqvae.decode_latents(z_q), tokens.flatten(1), loss, z_e)


@torch.no_grad()
def ema_update(vqvae: VQVAE, z_e: torch.Tensor, tokens: torch.Tensor, decay: float, eps: float = 1e-5) -> None:
    """One EMA codebook step from z_e (B, D, h, w) and its assignments tokens (B, h, w).

    The running counts/sums live in non-persistent buffers, so the state dict stays VQModel's;
    they start from the current codebook with a count of one per code.
    """
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema decay must be in (0, 1); got {decay}")
    k, d = vqvae.codebook.shape
    if not hasattr(vqvae, "ema_count"):
        vqvae.register_buffer("ema_count", torch.ones(k, device=vqvae.codebook.device), persistent=False)
        vqvae.register_buffer("ema_sum", vqvae.codebook.detach().float().clone(), persistent=False)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, d).float()  # (BHW, D)
    onehot = F.one_hot(tokens.flatten(), k).float()  # (BHW, K)
    vqvae.ema_count.mul_(decay).add_(onehot.sum(0), alpha=1 - decay)  # (K,)
    vqvae.ema_sum.mul_(decay).add_(onehot.T @ flat, alpha=1 - decay)  # (K, D)
    n = vqvae.ema_count.sum()
    count = (vqvae.ema_count + eps) / (n + k * eps) * n  # Laplace smoothing keeps unused codes finite
    vqvae.codebook.copy_(vqvae.ema_sum / count.unsqueeze(1))


@torch.no_grad()
def restart_codes(vqvae: VQVAE, z_e: torch.Tensor, min_count: float, generator: torch.Generator | None = None,
                  weights: torch.Tensor | None = None) -> int:
    """Move every code whose EMA usage is below ``min_count`` onto a random encoder output of
    this batch (z_e: (B, D, h, w)); ``min_count=inf`` re-initialises the whole codebook from data.
    ``weights`` (BHW,): pick latents in proportion to them, without replacement (uniformly when
    fewer than the dead codes are positive).

    Without it an EMA codebook collapses to a handful of codes (seen on the shapes data: 3-6 of
    512 used after 75 steps). Training only: it syncs with the host. Returns how many moved.
    """
    k, d = vqvae.codebook.shape
    if not hasattr(vqvae, "ema_count"):
        vqvae.register_buffer("ema_count", torch.ones(k, device=vqvae.codebook.device), persistent=False)
        vqvae.register_buffer("ema_sum", vqvae.codebook.detach().float().clone(), persistent=False)
    dead = (vqvae.ema_count < min_count).nonzero().flatten()  # (n,)
    if dead.numel() == 0:
        return 0
    flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, d).float()  # (BHW, D)
    if weights is not None and int((weights > 0).sum()) >= dead.numel():  # D^2 sampling, distinct latents
        pick = torch.multinomial(weights.float().cpu(), dead.numel(), generator=generator).to(flat.device)
    else:
        pick = torch.randint(0, flat.shape[0], (dead.numel(),), generator=generator).to(flat.device)  # (n,)
    vqvae.codebook[dead] = flat[pick].to(vqvae.codebook.dtype)
    vqvae.ema_sum[dead] = flat[pick]
    vqvae.ema_count[dead] = 1.0
    return int(dead.numel())


@dataclass(frozen=True)
class VQVAETrainConfig:
    """A run's settings; each field is a flag of ``vqdiff train vqvae`` (``add_arguments``)."""

    data: str = arg(help="image-caption folder (see model/train/data.py)")
    out: str = arg(help="run folder: checkpoint.pt, train.log, vqvae/")
    preset: str = arg("tiny", "the model preset whose VQVAE (and image size) to train")
    steps: int = arg(2000, "optimiser steps")
    batch_size: int = arg(32, "images per step")
    lr: float = arg(2e-4, "learning rate")
    ema_decay: float = arg(0.99, "codebook by EMA of assigned encoder outputs (0: by gradient)")
    restart_below: float = arg(0.1, "EMA usage below which a code restarts on a random latent (0: never)")
    restart_by_error: bool = arg(False, "where restarted codes go: a uniformly drawn latent, or one drawn in "
                                        "proportion to its squared distance from its code (k-means++)",
                                 flag="--restart-by", choices={"uniform": False, "error": True})
    tie_weight: float = arg(0.0, "weight of the loss tying the latents of pixel-identical patches "
                                 "(identical_patch_loss; 0: off)")
    log_every: int = arg(50, "steps between train.log records")
    ckpt_every: int = arg(200, "steps between checkpoints")
    seed: int = arg(0, "the seed of the batch order and every draw")


def train_vqvae(cfg: VQVAETrainConfig, progress: bool = True) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = from_name(cfg.preset)
    vq_cfg: VQVAEConfig = model_cfg.vqvae
    data = ImageCaptionFolder(cfg.data, model_cfg.image_size)
    if len(data) < cfg.batch_size:
        raise ValueError(f"{cfg.data}: {len(data)} images, fewer than batch_size {cfg.batch_size}")

    torch.manual_seed(cfg.seed)
    vqvae = VQVAE(vq_cfg)
    opt = torch.optim.AdamW(vqvae.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    ckpt_path, step = out / "checkpoint.pt", 0
    if (ckpt := load_checkpoint(ckpt_path)) is not None:
        if ckpt["vqvae_config"] != asdict(vq_cfg):
            raise ValueError(f"{ckpt_path}: was trained with another VQVAE config; use a new --out")
        vqvae.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        if "ema_count" in ckpt:
            vqvae.register_buffer("ema_count", ckpt["ema_count"], persistent=False)
            vqvae.register_buffer("ema_sum", ckpt["ema_sum"], persistent=False)
        step = ckpt["step"]

    log = JsonLog(out / "train.log")
    vqvae.train()
    t0 = time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="train vqvae", unit="step", disable=not progress)
    while step < cfg.steps:
        idx = batch_indices(len(data), cfg.batch_size, cfg.seed, step)
        x = torch.stack([data[int(i)][0] for i in idx])  # (B, 3, H, W)
        g = step_generator(cfg.seed, step)  # code restarts replay exactly on resume
        if cfg.ema_decay and step == 0:  # start the codebook on data, not near zero
            with torch.no_grad():
                restart_codes(vqvae, vqvae.encode(x), float("inf"), g)
        recon, tokens, vq_loss, z_e = training_pass(vqvae, x, ema_decay=cfg.ema_decay or None,
                                                    restart_below=cfg.restart_below, generator=g,
                                                    restart_by_error=cfg.restart_by_error)
        rec_loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        tie = identical_patch_loss(x, z_e) if cfg.tie_weight else None
        loss = rec_loss + vq_loss + (cfg.tie_weight * tie if tie is not None else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            used = torch.bincount(tokens.flatten(), minlength=vq_cfg.num_vq_embeddings)
            p = used.float() / used.sum()
            perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item()
            rec = {"step": step, "loss": round(loss.item(), 5), "rec": round(rec_loss.item(), 5),
                   "vq": round(vq_loss.item(), 5), "codes_used": int((used > 0).sum()),
                   **({"tie": round(tie.item(), 5)} if tie is not None else {}),
                   "perplexity": round(perplexity, 1), "elapsed_s": round(time.time() - t0, 1)}
            log.write(rec)
            bar.set_postfix(loss=rec["loss"], codes=rec["codes_used"])
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            state = {"step": step, "model": vqvae.state_dict(), "opt": opt.state_dict(),
                     "vqvae_config": asdict(vq_cfg), "train_config": asdict(cfg)}
            if hasattr(vqvae, "ema_count"):
                state.update(ema_count=vqvae.ema_count, ema_sum=vqvae.ema_sum)
            save_checkpoint(state, ckpt_path)
    bar.close()
    log.close()
    save_component(out / "vqvae", vqvae_config_to_diffusers(vq_cfg), vqvae.eval())
    return out / "vqvae"


def add_arguments(parser) -> None:
    """``vqdiff train vqvae``: one flag per ``VQVAETrainConfig`` field, and --quiet."""
    add_fields(parser, VQVAETrainConfig)
    add_quiet(parser)
    parser.set_defaults(func=run)


def run(args) -> None:
    print(train_vqvae(from_args(VQVAETrainConfig, args), progress=not args.quiet))
