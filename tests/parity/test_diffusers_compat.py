"""diffusers' own classes load the model folders this project writes, and generate from them."""

from __future__ import annotations

import pytest
import torch

from vqdiff.model.io.default import EMBEDDED
from vqdiff.model.io.folder import load_model, random_model, save_model

diffusers = pytest.importorskip("diffusers")


def diffusers_pipeline(folder):
    """VQDiffusionPipeline from a folder, component by component (docs/DESIGN.md section 8: its
    from_pretrained trips over the moved LearnedClassifierFreeSamplingEmbeddings module)."""
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
        LearnedClassifierFreeSamplingEmbeddings,
        VQDiffusionPipeline,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    return VQDiffusionPipeline(
        vqvae=diffusers.VQModel.from_pretrained(folder, subfolder="vqvae"),
        transformer=diffusers.Transformer2DModel.from_pretrained(folder, subfolder="transformer"),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        scheduler=diffusers.VQDiffusionScheduler.from_pretrained(folder, subfolder="scheduler"),
        learned_classifier_free_sampling_embeddings=LearnedClassifierFreeSamplingEmbeddings.from_pretrained(
            folder, subfolder="learned_classifier_free_sampling_embeddings"),
    ).to(torch.float32)


def _folders(tmp_path_factory, tokenizer, tiny_config):
    yield save_model(random_model(tiny_config, tokenizer, seed=6), tmp_path_factory.mktemp("d") / "tiny")
    if (EMBEDDED / "model_index.json").is_file():
        yield EMBEDDED


def test_diffusers_pipeline_generates_from_our_folders(tmp_path_factory, tokenizer, tiny_config):
    for folder in _folders(tmp_path_factory, tokenizer, tiny_config):
        pipe = diffusers_pipeline(folder)
        ours = load_model(folder)
        prompt = "a red circle above a blue square"
        # diffusers' pipeline runs end to end on the folder: every component loads, and the
        # transformer, the scheduler's steps down to t = 0 and the VQ decoder give an image. A few
        # steps run the same code as 100 (that our posterior sampler reproduces this pipeline's
        # 100-step image is tests/unit/test_sampler.py's parity test).
        out = pipe(prompt, num_inference_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                   output_type="np").images
        side = ours.config.image_size
        assert out.shape == (1, side, side, 3) and 0 <= out.min() and out.max() <= 1
        # the same folder read by both gives the same text features, null condition and predictions
        # (fp32 parity within 1e-4: two implementations of the same float math)
        with torch.no_grad():
            emb = pipe._encode_prompt(prompt, 1, True)  # [null; text]
            assert (emb[1:] - ours.encode_text([prompt])).abs().max() <= 1e-4
            assert (emb[:1] - ours.null_text(1)).abs().max() <= 1e-4
            c = ours.config.transformer
            x_t = torch.randint(0, c.num_embed, (2, c.num_tokens), generator=torch.Generator().manual_seed(1))
            x_t[:, ::3] = c.mask_id  # (2, N), masks included
            for t in (3, 0):
                want = pipe.transformer(x_t, encoder_hidden_states=emb, timestep=torch.tensor(t)).sample  # (B, K, N)
                got = ours.transformer.log_probs(x_t, torch.full((2,), t), emb).transpose(1, 2)  # (B, K, N)
                assert (want - got).abs().max() <= 1e-4, (folder, t)
