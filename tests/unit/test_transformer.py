"""The content transformer: parity with diffusers, per-sample timesteps, cached text keys/values, ITHQ shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vqdiff.model.config import ithq
from vqdiff.model.io.folder import transformer_config_from_diffusers
from vqdiff.model.net.transformer import VQDiffusionTransformer

from tests.conftest import randomize_

ITHQ = Path(__file__).parents[1] / "fixtures" / "ithq"


@pytest.fixture(scope="module")
def net(tiny_config):
    torch.manual_seed(0)
    return randomize_(VQDiffusionTransformer(tiny_config.transformer)).eval()


def _inputs(c, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randint(0, c.num_embed + 1, (b, c.num_tokens), generator=g)  # (B, N), masks included
    text = torch.randn(b, 77, c.text_dim, generator=g)  # (B, L, D)
    return x_t, text


def test_matches_diffusers_transformer(diffusers_pipeline, tiny_config):
    ref = diffusers_pipeline.transformer.eval()
    ours = VQDiffusionTransformer(tiny_config.transformer).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x_t, text = _inputs(tiny_config.transformer, b=3)
    for t in (0, 7, 99):
        want = ref(x_t, encoder_hidden_states=text, timestep=torch.tensor(t)).sample  # (B, K, N)
        got = ours.log_probs(x_t, torch.full((3,), t), text).transpose(1, 2)  # (B, K, N)
        assert (want - got).abs().max() <= 1e-4, f"t={t}"


def test_per_sample_timesteps_equal_rows_alone(net, tiny_config):
    x_t, text = _inputs(tiny_config.transformer)
    t = torch.tensor([0, 3, 50, 99])
    with torch.no_grad():
        batched = net(x_t, t, text)  # (B, N, K)
        for i in range(4):
            alone = net(x_t[i : i + 1], t[i : i + 1], text[i : i + 1])
            assert (batched[i] - alone[0]).abs().max() <= 1e-5
        # and the timestep matters: the same row at another t gives another answer
        other = net(x_t[:1], torch.tensor([60]), text[:1])
        assert (other[0] - batched[0]).abs().max() > 1e-3


def test_cached_text_kv_equals_text(net, tiny_config):
    x_t, text = _inputs(tiny_config.transformer)
    t = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        kv = net.text_kv(text)  # (layers, 2, B, H, L, Dh)
        c = tiny_config.transformer
        assert kv.shape == (c.num_layers, 2, 4, c.num_heads, 77, c.head_dim)
        assert torch.equal(net(x_t, t, text_kv=kv), net(x_t, t, text))
        # rows of different requests concatenate along the batch axis of the cache
        kv2 = torch.cat([net.text_kv(text[:2]), net.text_kv(text[2:])], dim=2)
        assert (net(x_t, t, text_kv=kv2) - net(x_t, t, text)).abs().max() <= 1e-5


def test_bad_inputs_are_rejected(net, tiny_config):
    x_t, text = _inputs(tiny_config.transformer)
    with pytest.raises(ValueError, match="per sample"):
        net(x_t, torch.tensor(5), text)
    with pytest.raises(ValueError, match="x_t must be"):
        net(x_t[:, :10], torch.zeros(4, dtype=torch.long), text)
    with pytest.raises(ValueError, match="exactly one"):
        net(x_t, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="text must be"):
        net(x_t, torch.zeros(4, dtype=torch.long), text[..., :5])


def test_ithq_preset_matches_ithq_config_and_diffusers_state_dict():
    diffusers = pytest.importorskip("diffusers")
    cfg_json = json.loads((ITHQ / "transformer" / "config.json").read_text())
    assert transformer_config_from_diffusers(cfg_json, ITHQ) == ithq().transformer
    with torch.device("meta"):
        ours = VQDiffusionTransformer(ithq().transformer)
        ref = diffusers.Transformer2DModel(**{k: v for k, v in cfg_json.items() if not k.startswith("_")})
    n_params = sum(p.numel() for p in ours.parameters())
    assert 1.34e9 < n_params < 1.38e9, n_params
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert set(theirs) - set(mine) == set(), "missing in ours"
    assert set(mine) - set(theirs) == set(), "unexpected in ours"
    assert {k for k in mine if mine[k] != theirs[k]} == set(), "mis-shaped"
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
