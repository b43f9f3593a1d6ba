"""Shared fixtures: a tiny random model (ours) and a tiny diffusers VQ-Diffusion pipeline folder."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

# Without CUDA the Triton kernels run under the interpreter. TRITON_INTERPRET must be set before
# anything imports triton (torch._dynamo does, through vqdiff.model.io.folder), so it is set here, first; the
# switch (step_ops in model/sampling/step.py) still picks the torch references on a CPU (tests/unit/test_kernels.py
# forces kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vqdiff.model.config import tiny
from vqdiff.model.net.tokenizer import word_tokenizer

WORDS = ["a", "an", "red", "green", "blue", "circle", "square", "triangle", "above", "below", "left", "of", "the"]


def randomize_(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (norm affines and biases too), so that parity tests can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture(scope="session")
def tokenizer():
    return word_tokenizer(WORDS)


@pytest.fixture(scope="session")
def tiny_config():
    return tiny()


@pytest.fixture(scope="session")
def diffusers_pipeline(tokenizer, tiny_config):
    """diffusers' own VQ-Diffusion classes, shaped like ITHQ in miniature, random weights."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
        LearnedClassifierFreeSamplingEmbeddings,
        VQDiffusionPipeline,
    )
    from transformers import CLIPTextModel

    from vqdiff.model.io.folder import transformer_config_to_diffusers, vqvae_config_to_diffusers
    from vqdiff.model.net.text_encoder import clip_config

    c = tiny_config
    torch.manual_seed(0)
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    transformer = diffusers.Transformer2DModel(**strip(transformer_config_to_diffusers(c.transformer)))
    vqvae = diffusers.VQModel(**strip(vqvae_config_to_diffusers(c.vqvae)))
    clip = CLIPTextModel(clip_config(c.text_encoder, tokenizer))
    null = LearnedClassifierFreeSamplingEmbeddings(learnable=True, hidden_size=c.text_encoder.hidden_size, length=77)
    for i, m in enumerate((transformer, vqvae, clip, null)):
        randomize_(m, std=0.2 if m is not clip else 0.05, seed=i)
    scheduler = diffusers.VQDiffusionScheduler(num_vec_classes=c.transformer.num_embed + 1)
    pipe = VQDiffusionPipeline(
        vqvae=vqvae, text_encoder=clip, tokenizer=tokenizer, transformer=transformer, scheduler=scheduler,
        learned_classifier_free_sampling_embeddings=null,
    )
    return pipe.to(torch.float32)


@pytest.fixture(scope="session")
def diffusers_folder(diffusers_pipeline, tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusers") / "tiny-vqd"
    diffusers_pipeline.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A real redis-server for one test module (tests/serving.py ``RedisServer``)."""
    from tests.serving import RedisServer

    s = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield s
    s.stop()


LAYERS = ("unit", "integration", "parity", "e2e")


def pytest_collection_modifyitems(config, items):
    """Each test carries the marker of the folder it lives in (pyproject.toml lists the layers)."""
    for item in items:
        layer = item.path.parent.name
        if layer not in LAYERS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/<layer>/, layer one of {LAYERS}")
        item.add_marker(getattr(pytest.mark, layer))
