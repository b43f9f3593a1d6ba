"""model/net/vqvae.py: parity with diffusers' VQModel (tiny, CPU), ITHQ key/shape layout (meta), gradients."""

from __future__ import annotations

import pytest
import torch

from vqdiff.model.config import ithq, tiny
from vqdiff.model.net.vqvae import VQVAE
from vqdiff.model.train.vqvae import ema_update, identical_patch_loss, restart_codes, training_pass

ITHQ_VQVAE_JSON = {  # microsoft/vq-diffusion-ithq vqvae/config.json
    "_class_name": "VQModel",
    "act_fn": "silu",
    "block_out_channels": [64, 128, 256, 512],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
    "in_channels": 3,
    "latent_channels": 256,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "num_vq_embeddings": 4096,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    "vq_embed_dim": 128,
}


def diffusers_vqmodel(cfg):
    diffusers = pytest.importorskip("diffusers")  # parity reference only
    return diffusers.VQModel(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=[("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D") for a in cfg.attention],
        up_block_types=[("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D") for a in reversed(cfg.attention)],
        block_out_channels=list(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        act_fn="silu",
        latent_channels=cfg.latent_channels,
        num_vq_embeddings=cfg.num_vq_embeddings,
        vq_embed_dim=cfg.vq_embed_dim,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.sample_size,
        mid_block_add_attention=cfg.mid_block_add_attention,
    )


@pytest.fixture(scope="module")
def pair():
    """A randomly initialised diffusers VQModel and ours with its weights (strict load)."""
    cfg = tiny().vqvae
    torch.manual_seed(0)
    ref = diffusers_vqmodel(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:  # GroupNorm affine: default 1/0 would hide a missing or swapped norm
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
        ref.quantize.embedding.weight.normal_()  # spread the codes so nearest-code ties are impossible
    ours = VQVAE(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return cfg, ref, ours


def test_encode_matches_diffusers(pair):
    cfg, ref, ours = pair
    images = torch.rand(2, 3, cfg.sample_size, cfg.sample_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.encode(images * 2 - 1).latents
        got = ours.encode(images)
    assert got.shape == want.shape == (2, cfg.vq_embed_dim, 8, 8)
    assert (got - want).abs().max().item() <= 1e-4


def test_tokenize_matches_diffusers(pair):
    cfg, ref, ours = pair
    images = torch.rand(3, 3, cfg.sample_size, cfg.sample_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        latents = ref.encode(images * 2 - 1).latents
        _, _, (_, _, idx) = ref.quantize(latents)
        got = ours.tokenize(images)
    assert got.dtype == torch.long and got.shape == (3, 64)
    # Token ids are argmins over distances each implementation computes with its own float math
    # (latents agree to ~1e-6 here, 1e-4 at most), so they are compared exactly only where no
    # latent is near a tie: its two nearest codes differ by more than 1e-3 in squared distance,
    # far beyond what such latent errors move a distance (about 2 * |z - e| * |dz|).
    flat = latents.permute(0, 2, 3, 1).reshape(-1, cfg.vq_embed_dim)  # (BHW, D)
    two = torch.cdist(flat, ref.quantize.embedding.weight).pow(2).topk(2, dim=1, largest=False).values
    assert (two[:, 1] - two[:, 0]).min() > 1e-3
    assert torch.equal(got, idx.view(3, 64))


@pytest.mark.parametrize("grid", [False, True])
def test_decode_matches_diffusers(pair, grid):
    cfg, ref, ours = pair
    b, h, w = 2, 8, 8
    tokens = torch.randint(0, cfg.num_vq_embeddings, (b, h * w), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        latents = ref.quantize.get_codebook_entry(tokens.flatten(), (b, h, w, cfg.vq_embed_dim))
        want = (ref.decode(latents, force_not_quantize=True).sample / 2 + 0.5).clamp(0, 1)
        got = ours.decode_tokens(tokens.view(b, h, w) if grid else tokens)
    assert got.shape == want.shape == (b, 3, cfg.sample_size, cfg.sample_size)
    assert (got - want).abs().max().item() <= 1e-4
    assert 0.0 <= got.min() and got.max() <= 1.0


def test_ithq_layout_matches_diffusers_on_meta():
    diffusers = pytest.importorskip("diffusers")
    kwargs = {k: v for k, v in ITHQ_VQVAE_JSON.items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = diffusers.VQModel(**kwargs)
        ours = VQVAE(ithq().vqvae)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sorted(got.keys() - want.keys()) == [], "unexpected keys"
    assert sorted(want.keys() - got.keys()) == [], "missing keys"
    assert {k: (got[k], want[k]) for k in want if got[k] != want[k]} == {}, "mis-shaped keys"
    assert ithq().vqvae.downsample == 8


def test_straight_through_gradient_reaches_encoder():
    cfg = tiny().vqvae
    torch.manual_seed(0)
    model = VQVAE(cfg).train()
    images = torch.rand(2, 3, cfg.sample_size, cfg.sample_size)
    recon, tokens, vq_loss, _ = model(images)
    assert recon.shape == images.shape and tokens.shape == (2, 64) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < cfg.num_vq_embeddings
    assert torch.isfinite(vq_loss) and vq_loss.item() > 0
    ((recon - images) ** 2).mean().backward(retain_graph=True)  # reconstruction alone: only the straight-through path
    g = model.encoder.conv_in.weight.grad
    assert g is not None and g.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None  # the codebook gets no reconstruction gradient
    model.zero_grad()
    vq_loss.backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_quantize_latents_snaps_to_codes():
    cfg = tiny().vqvae
    model = VQVAE(cfg)
    codes = model.quantize.embedding.weight.detach()  # (K, D)
    tokens = torch.randint(0, cfg.num_vq_embeddings, (2, 4, 5))
    z = codes[tokens].permute(0, 3, 1, 2) + 1e-6  # (B, D, h, w), non-square grid
    z_q, got, loss = model.quantize_latents(z)
    assert torch.equal(got, tokens) and z_q.shape == z.shape
    assert loss.item() < 1e-9


def test_bad_inputs_raise():
    cfg = tiny().vqvae
    model = VQVAE(cfg)
    k = cfg.num_vq_embeddings
    with pytest.raises(ValueError, match=rf"{k}.*{k}"):
        model.decode_tokens(torch.tensor([[0, 1, k, 2]]))
    with pytest.raises(ValueError, match=r"-3"):
        model.decode_tokens(torch.tensor([[0, -3, 1, 2]]))
    with pytest.raises(ValueError, match="square"):
        model.decode_tokens(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model.decode_tokens(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="shape"):
        model.encode(torch.rand(1, 3, 15, 16))
    with pytest.raises(ValueError, match="shape"):
        model.encode(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="z_e"):
        model.quantize_latents(torch.rand(1, cfg.vq_embed_dim + 1, 2, 2))


def test_ema_update_moves_codes_toward_assigned_latents():
    cfg = tiny().vqvae
    torch.manual_seed(0)
    model = VQVAE(cfg).train()
    keys_before = set(model.state_dict())
    before = model.quantize.embedding.weight.detach().clone()
    images = torch.rand(2, 3, cfg.sample_size, cfg.sample_size)
    z_e = model.encode(images).detach()
    _, tokens, _ = model.quantize_latents(z_e)
    _, _, loss, _ = training_pass(model, images, ema_decay=0.5)
    after = model.quantize.embedding.weight.detach()
    used = tokens.unique()
    unused = torch.ones(cfg.num_vq_embeddings, dtype=torch.bool)
    unused[used] = False
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, cfg.vq_embed_dim)
    mean = torch.stack([flat[tokens.flatten() == t].mean(0) for t in used])  # (U, D)
    assert ((after[used] - mean).norm(dim=1) < (before[used] - mean).norm(dim=1)).all()
    assert torch.allclose(after[unused], before[unused], rtol=1e-3, atol=1e-6)
    assert set(model.state_dict()) == keys_before  # EMA statistics stay out of the checkpoint
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="decay"):
        ema_update(model, z_e, tokens, 1.0)


def test_restart_codes_moves_only_rarely_used_codes_onto_latents():
    cfg = tiny().vqvae
    torch.manual_seed(0)
    model = VQVAE(cfg).train()
    images = torch.rand(4, 3, cfg.sample_size, cfg.sample_size)
    z_e = model.encode(images).detach()
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, cfg.vq_embed_dim)  # (BHW, D)

    # min_count = inf re-initialises every code from the data
    g = torch.Generator().manual_seed(1)
    assert restart_codes(model, z_e, float("inf"), g) == cfg.num_vq_embeddings
    on_latent = (model.codebook.detach()[:, None, :] == flat[None, :, :]).all(-1).any(-1)  # (K,)
    assert on_latent.all()  # each code is exactly some latent

    # afterwards only the codes whose EMA usage fell below the threshold move
    model.ema_count[:] = 1.0
    model.ema_count[[3, 7]] = 0.01
    before = model.codebook.detach().clone()
    assert restart_codes(model, z_e, 0.1, g) == 2
    moved = (model.codebook.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert set(moved) <= {3, 7}
    assert model.ema_count[[3, 7]].tolist() == [1.0, 1.0]
    # the same generator seed replays the same restarts (resumed training stays exact)
    again = VQVAE(cfg)
    again.load_state_dict(model.state_dict())
    assert restart_codes(again, z_e, float("inf"), torch.Generator().manual_seed(5)) == \
        restart_codes(model, z_e, float("inf"), torch.Generator().manual_seed(5))
    assert torch.equal(again.codebook, model.codebook)


def test_identical_patch_loss_ties_only_pixel_identical_patches():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 8)  # 2 x 2 patches of 4 x 4: all distinct
    images[:, :, :4, :4] = 1.0  # the top-left patch of both images is plain white: one group of two
    z_e = torch.randn(2, 5, 2, 2, requires_grad=True)
    loss = identical_patch_loss(images, z_e)
    flat = z_e.permute(0, 2, 3, 1).reshape(8, 5)
    spread = (flat - flat.mean(0)).pow(2).mean()  # relative to the latents' variance: scale-free
    want = (z_e[0, :, 0, 0] - z_e[1, :, 0, 0]).pow(2).mean() / 4 / spread  # each member: half the gap
    assert torch.allclose(loss, want)
    loss.backward()
    grad = z_e.grad.abs().sum(1)  # (B, h, w)
    assert (grad[:, 0, 0] > 0).all()
    assert torch.allclose(identical_patch_loss(images, 3 * z_e), loss)  # no gain in shrinking the latents
    z_tied = z_e.detach().clone()
    z_tied[1, :, 0, 0] = z_tied[0, :, 0, 0]
    assert identical_patch_loss(images, z_tied).item() == 0.0
    # no identical patches: 0 with a graph; latents that do not tile the images: a clear error
    assert identical_patch_loss(torch.rand(2, 3, 8, 8), z_e).item() == 0.0
    with pytest.raises(ValueError, match="do not tile"):
        identical_patch_loss(torch.rand(2, 3, 8, 9), z_e)


def test_restart_codes_by_error_picks_only_weighted_latents():
    cfg = tiny().vqvae
    torch.manual_seed(0)
    model = VQVAE(cfg).train()
    z_e = model.encode(torch.rand(4, 3, cfg.sample_size, cfg.sample_size)).detach()
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, cfg.vq_embed_dim)  # (BHW, D)
    restart_codes(model, z_e, float("inf"), torch.Generator().manual_seed(1))
    model.ema_count[:] = 1.0
    model.ema_count[[2, 5, 9]] = 0.0
    weights = torch.zeros(flat.shape[0])
    weights[[4, 11, 30]] = torch.tensor([1.0, 2.0, 3.0])  # the only latents the codebook fits badly
    assert restart_codes(model, z_e, 0.1, torch.Generator().manual_seed(2), weights=weights) == 3
    moved = model.codebook.detach()[[2, 5, 9]]  # (3, D): exactly the three weighted latents, each once
    assert sorted((moved[:, None, :] == flat[None, [4, 11, 30], :]).all(-1).nonzero()[:, 1].tolist()) == [0, 1, 2]


def test_tokeniser_stats_counts_codes_and_bits_of_plain_patches():
    from vqdiff.model.shapes.evaluate import tokeniser_stats

    class Fixed:  # a "VQVAE" giving white patches code 0 and every other patch its position + 1
        def eval(self):
            return self

        def tokenize(self, images):  # (n, 3, 32, 32) -> (n, 64)
            n = images.shape[0]
            white = (images.unfold(2, 4, 4).unfold(3, 4, 4) == 1).flatten(-2).all(-1).all(1).reshape(n, 64)
            return torch.where(white, 0, torch.arange(1, 65).expand(n, 64))

    s = tokeniser_stats(Fixed(), n=8)
    assert s["white_codes"] == 1 and s["white_bits"] == 0.0 and 0.3 < s["white_share"] < 1
    assert s["plain_share"] >= s["white_share"] and s["codes_used"] > 1 and s["bits_per_token"] > 0


def test_load_vqvae_reads_a_component_folder_as_load_model_does():
    from pathlib import Path

    from vqdiff.model.io.folder import load_model, load_vqvae

    root = Path(__file__).resolve().parents[2] / "models" / "default"
    alone, whole = load_vqvae(root / "vqvae"), load_model(root).vqvae
    assert not alone.training and alone.state_dict().keys() == whole.state_dict().keys()
    assert all(torch.equal(v, whole.state_dict()[k]) for k, v in alone.state_dict().items())
