"""``vqdiff train vqvae``: train the image tokeniser on an image-caption folder (captions unused).

Resumable: every ``ckpt_every`` steps the full state (weights, optimiser, EMA codebook statistics,
step) goes to OUT/checkpoint.pt atomically, and a run pointed at the same OUT continues from it
with the same batch order. At the end OUT/vqvae/ holds the component in the model-folder layout
(config.json + diffusion_pytorch_model.safetensors) that ``vqdiff train transformer`` builds on.
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
from vqdiff.model.train.common import JsonLog, batch_indices, load_checkpoint, save_checkpoint, step_generator
from vqdiff.model.net.vqvae import VQVAE, identical_patch_loss


@dataclass(frozen=True)
class VQVAETrainConfig:
    data: str
    out: str
    preset: str = "tiny"  # the model preset whose VQVAE (and image size) to train
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-4
    ema_decay: float = 0.99  # codebook by EMA of assigned encoder outputs (0 = by gradient)
    restart_below: float = 0.1  # EMA usage under which a code is moved onto a random latent (0 = never)
    restart_by_error: bool = False  # draw restart latents by squared distance to their code (k-means++)
    tie_weight: float = 0.0  # weight of identical_patch_loss: pixel-identical patches, one latent
    log_every: int = 50
    ckpt_every: int = 200
    seed: int = 0


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
                vqvae.restart_codes(vqvae.encode(x), float("inf"), g)
        recon, tokens, vq_loss, z_e = vqvae(x, ema_decay=cfg.ema_decay or None, restart_below=cfg.restart_below,
                                            generator=g, restart_by_error=cfg.restart_by_error)
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
