"""Token-space editing (model/sampling/edit.py): frozen tokens stay exactly, the plan spreads the steps
over the repainted tokens, variations repaint their share, the posterior samplers refuse."""

from __future__ import annotations

import pytest
import torch

from vqdiff.model.diffusion import timestep_for_mask_fraction
from vqdiff.model.io.folder import random_model
from vqdiff.model.sampling.edit import (
    check_mask, edit, edit_params, start_grids, token_mask, variation_count, variation_mask,
)
from vqdiff.model.sampling.sampler import plan, request_params, sample


@pytest.fixture(scope="module")
def model(tokenizer, tiny_config):
    m = random_model(tiny_config, tokenizer, seed=5).eval()
    with torch.no_grad():
        m.transformer.out.weight.mul_(40.0)
    return m


def _images(model, b=2, seed=0):
    s = model.config.image_size
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(seed))  # (B, 3, H, W)


def _left_half(model):
    s = model.config.image_size
    m = torch.zeros(s, s, dtype=torch.bool)
    m[:, : s // 2] = True
    return m  # (H, W)


def test_a_token_is_repainted_when_any_pixel_of_its_patch_is():
    pixels = torch.zeros(8, 8, dtype=torch.bool)  # a 4x4 grid of 2x2 patches
    pixels[0, 0] = True  # one pixel of patch (0, 0)
    pixels[5, 6] = True  # one pixel of patch (2, 3)
    edit = token_mask(pixels, 4, 4)
    assert edit.shape == (16,) and edit.nonzero().flatten().tolist() == [0, 2 * 4 + 3]
    with pytest.raises(ValueError, match="tile"):
        token_mask(torch.zeros(9, 8, dtype=torch.bool), 4, 4)


def test_empty_and_full_masks_are_refused():
    with pytest.raises(ValueError, match="mask: marks no pixel"):
        check_mask(torch.zeros(16, dtype=torch.bool))
    with pytest.raises(ValueError, match="plain generation"):
        check_mask(torch.ones(16, dtype=torch.bool))
    assert check_mask(torch.tensor([True, False, True])) == 2


def test_frozen_tokens_equal_the_images_tokens_exactly(model):
    images, masks = _images(model), _left_half(model).expand(2, -1, -1)
    c = model.config.transformer
    for sampler in ("purity", "random"):
        params = request_params(model, {"sampler": sampler, "steps": 8, "seed": 3})
        out = edit(model, images, ["a red circle", "a blue square"], params, masks=masks, decode=False)
        source = model.vqvae.tokenize(images)  # (B, N)
        frozen = ~token_mask(masks[0], c.height, c.width)  # (N,)
        assert torch.equal(out.tokens[:, frozen], source[:, frozen])
        assert (out.tokens != c.mask_id).all()  # every repainted token was drawn
        assert not torch.equal(out.tokens[:, ~frozen], source[:, ~frozen])  # and something changed there


def test_the_plan_spreads_the_steps_over_the_repainted_tokens_from_their_fraction(model):
    c, sched = model.config.transformer, model.schedule
    p = plan("purity", 5, c.num_tokens, sched, masked=16)
    assert sum(p.counts) == 16 and p.steps == 5
    first = timestep_for_mask_fraction(sched, torch.tensor([16 / c.num_tokens], dtype=torch.float64))
    assert p.timesteps[0] == int(first) and p.timesteps[0] < plan("purity", 5, c.num_tokens, sched).timesteps[0]
    with pytest.raises(ValueError, match="the 16 tokens to repaint"):
        plan("purity", 17, c.num_tokens, sched, masked=16)


def test_steps_are_capped_at_the_repainted_tokens_and_posterior_refuses(model):
    assert edit_params(request_params(model, {"steps": 40}), 12).steps == 12
    assert edit_params(request_params(model, {"steps": 4}), 12).steps == 4
    for sampler in ("posterior", "skip"):
        with pytest.raises(ValueError, match=f"sampler: '{sampler}' cannot edit"):
            edit_params(request_params(model, {"sampler": sampler}), 12)


def test_an_edit_equals_itself_in_any_batch_and_beside_generation(model):
    """The seed rule and batch independence: an edit row stepped with a generation row and another
    edit gives the bits it gives alone."""
    c = model.config.transformer
    images = _images(model, 2, seed=1)
    edits = [token_mask(_left_half(model), c.height, c.width), variation_mask(9, 0.5, c.num_tokens)]
    grids = start_grids(model, images, edits)
    params = [edit_params(request_params(model, {"steps": 6, "seed": 7 + i}), int(e.sum())) for i, e in enumerate(edits)]
    gen = request_params(model, {"steps": 6, "seed": 11, "guidance_scale": 3.0})
    together = sample(model, ["a", "b", "c"], [params[0], gen, params[1]], decode=False, inits=[grids[0], None, grids[1]])
    for i, (grid, p) in enumerate(zip(grids, params)):
        alone = sample(model, ["ac"[i]], [p], decode=False, inits=[grid])
        assert torch.equal(alone.tokens[0], together.tokens[2 * i])
    assert torch.equal(sample(model, ["b"], [gen], decode=False).tokens[0], together.tokens[1])


def test_variations_repaint_their_share_chosen_by_the_seed(model):
    n = model.config.transformer.num_tokens
    for s in (0.1, 0.5, 1.0):
        m = variation_mask(42, s, n)
        assert int(m.sum()) == variation_count(s, n) == max(1, round(s * n))
    assert torch.equal(variation_mask(42, 0.5, n), variation_mask(42, 0.5, n))
    assert not torch.equal(variation_mask(42, 0.5, n), variation_mask(43, 0.5, n))
    assert variation_count(1e-6, n) == 1
    for bad in (0.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="strength"):
            variation_count(bad, n)


def test_a_variation_keeps_the_tokens_it_does_not_choose(model):
    images = _images(model, 1, seed=2)
    params = request_params(model, {"steps": 8, "seed": 5})
    out = edit(model, images, ["a green triangle"], params, strength=0.25, decode=False)
    kept = ~variation_mask(5, 0.25, model.config.transformer.num_tokens)
    assert torch.equal(out.tokens[0, kept], model.vqvae.tokenize(images)[0, kept])
    with pytest.raises(ValueError, match="not both"):
        edit(model, images, ["x"], params, masks=_left_half(model)[None], strength=0.5)
    full = edit(model, images, ["x"], params, strength=1.0, decode=False)  # every token redrawn: allowed
    assert (full.tokens != model.config.transformer.mask_id).all()


def test_cli_edit_writes_the_library_edit(model, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from tests.serving import cli
    from vqdiff.model.io.folder import save_model
    from vqdiff.model.io.images import decode_pngs

    folder = save_model(model, tmp_path / "m")
    s = model.config.image_size
    rgb = np.random.default_rng(3).integers(0, 256, (s, s, 3), dtype=np.uint8)
    alpha = np.full((s, s, 1), 255, np.uint8)
    alpha[: s // 2] = 0  # the top half is repainted
    Image.fromarray(rgb).save(tmp_path / "in.png")
    Image.fromarray(np.concatenate([rgb, alpha], -1)).save(tmp_path / "mask.png")
    code, err = cli(capsys, "edit", str(tmp_path / "in.png"), "a red circle", "--mask", str(tmp_path / "mask.png"),
                    "--model", str(folder), "-o", str(tmp_path / "out.png"), "--steps", "5", "--seed", "2", "--quiet")
    assert code == 0, err
    masks = torch.zeros(1, s, s, dtype=torch.bool)
    masks[:, : s // 2] = True
    images = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    want = edit(model, images, ["a red circle"], request_params(model, {"steps": 5, "seed": 2}), masks=masks,
                decode=False)
    assert (tmp_path / "out.png").read_bytes() == decode_pngs(model, want.tokens)[0]
    code, err = cli(capsys, "edit", str(tmp_path / "in.png"), "x", "--model", str(folder), "--quiet",
                    "-o", str(tmp_path / "o.png"))  # no mask, and the image has no transparency
    assert code == 2 and "mask: has no alpha channel" in err
    code, err = cli(capsys, "edit", str(tmp_path / "in.png"), "--strength", "2", "--model", str(folder), "--quiet")
    assert code == 2 and "strength" in err
