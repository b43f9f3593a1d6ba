"""Requests with guidance_scale 1 run no unconditional row: Eq. 7 at scale 1 is the cond branch."""

from __future__ import annotations

import pytest
import torch

from tests.serving import confident_model
from vqdiff.model.sampling.sampler import advance, batch_text_kv, forward_rows, request_params, sample, start


@pytest.fixture(scope="module")
def model(tokenizer, tiny_config):
    return confident_model(tokenizer, tiny_config)


def test_a_forward_runs_a_cond_row_each_and_an_uncond_row_each_guided_request(model):
    params = [request_params(model, {"guidance_scale": g, "seed": i, "steps": 4}) for i, g in enumerate((1.0, 3.0, 1.0))]
    states = start(model, ["a red circle", "a blue square", "a green triangle"], params)
    assert forward_rows(states) == 4 and batch_text_kv(states).shape[2] == 4
    seen = []

    def forward(x, t, text_kv):
        seen.append((x.shape[0], text_kv.shape[2]))
        return model.transformer(x, t, text_kv=text_kv)

    advance(model.transformer, model.schedule, states, forward=forward)
    assert seen == [(4, 4)]  # 3 cond rows + the one guided request's uncond row


def test_at_scale_1_the_unconditional_branch_does_not_matter(model):
    """Same seed, scale 1, three different unconditional branches: the same tokens, bit for bit
    (the uncond row is not run, and the cond branch is used exactly)."""
    runs = []
    for uncond in ({"uncond": "null"}, {"uncond": "empty"}, {"uncond": "negative", "negative_prompt": "a square"}):
        p = request_params(model, {"guidance_scale": 1.0, "seed": 42, "steps": 6, **uncond})
        runs.append(sample(model, ["a red circle above a blue square"], p, decode=False).tokens)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_a_batch_mixing_scales_draws_what_each_request_draws_alone(model):
    prompts = ["a red circle", "a blue square", "a green triangle", "a red square"]
    params = [request_params(model, {"guidance_scale": g, "seed": 5 + i, "steps": 6})
              for i, g in enumerate((1.0, 4.0, 1.0, 2.0))]
    together = sample(model, prompts, params, decode=False).tokens  # (4, N)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        assert torch.equal(together[i], sample(model, [prompt], p, decode=False).tokens[0]), f"request {i}"
