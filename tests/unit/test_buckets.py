"""Row buckets: a batch padded to its bucket gives its real rows what they get unpadded, and the
padding never leaves the forward."""

from __future__ import annotations

import pytest
import torch

from vqdiff.model.io.folder import random_model
from vqdiff.model.sampling.buckets import BucketedForward, bucket_sizes
from vqdiff.model.sampling.sampler import batch_text_kv, request_params, sample, start


@pytest.fixture(scope="module")
def model(tokenizer, tiny_config):
    m = random_model(tiny_config, tokenizer, seed=3).eval()
    with torch.no_grad():
        m.transformer.out.weight.mul_(40.0)  # confident, varied predictions
    return m


def test_bucket_sizes_are_powers_of_two_up_to_max_rows():
    assert bucket_sizes(64) == (2, 4, 8, 16, 32, 64)
    assert bucket_sizes(12) == (2, 4, 8, 12)
    assert bucket_sizes(2) == (2,)
    f = BucketedForward(torch.nn.Identity(), 12, pad=True)
    assert [f.rows_for(r) for r in (1, 2, 3, 5, 8, 9, 12)] == [2, 2, 4, 8, 8, 12, 12]
    with pytest.raises(ValueError, match="exceed the largest bucket"):
        f.rows_for(13)
    assert BucketedForward(torch.nn.Identity(), 12).rows_for(5) == 5  # eager: no padding
    with pytest.raises(ValueError, match="compile: 'fast' is not allowed"):
        BucketedForward(torch.nn.Identity(), 12, mode="fast")


def inputs(model, prompts):
    states = start(model, prompts, [request_params(model, {"seed": 10 + i}) for i in range(len(prompts))])
    x = torch.stack([s.tokens for s in states])  # (B, N): all [MASK]
    x = torch.cat([x, x])  # (2B, N), as advance builds it
    t = torch.full((x.shape[0],), 50, dtype=torch.long)
    return x, t, batch_text_kv(states)  # (layers, 2, 2B, H, L, Dh)


@pytest.mark.parametrize("images", [1, 3, 5])  # 2, 6, 10 rows: padded to 2, 8, 16
def test_padding_rows_never_change_a_real_row(model, images):
    prompts = ["a red circle", "a blue square", "a green triangle", "a red square", "a blue circle"][:images]
    x, t, kv = inputs(model, prompts)
    padded = BucketedForward(model.transformer, 16, pad=True)
    with torch.no_grad():
        want = model.transformer(x, t, text_kv=kv)  # (2B, N, K)
        got = padded(x, t, padded.pad_kv(kv))
        got_unpadded_kv = padded(x, t, kv)  # the forward pads the k/v itself when the caller did not
    assert got.shape == want.shape  # the padding rows never leave the forward
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32: a kernel picked by batch size moves last bits
    torch.testing.assert_close(got_unpadded_kv, got, rtol=0, atol=0)
    assert padded.pad_kv(kv).shape[2] == padded.rows_for(2 * images)


def test_the_engine_path_with_padding_draws_what_each_request_draws_alone(model):
    from vqdiff.server.engine import Engine
    from vqdiff.server.request import Request, Result
    from vqdiff.server.settings import Settings

    engine = Engine(model, Settings(max_rows=16))
    engine.forward = BucketedForward(model.transformer, 16, pad=True)  # the compiled path's padding, eager
    seen = []  # rows of every forward the transformer ran
    engine.forward.fn = lambda x, t, text_kv: seen.append(x.shape[0]) or model.transformer(x, t, text_kv=text_kv)
    results = {}
    reqs = [Request(prompt=p, params=request_params(model, {"seed": 7 + i, "steps": 6}), n=1 + (i > 0),
                    emit=lambda e, i=i: results.__setitem__(i, e) if isinstance(e, Result) else None)
            for i, p in enumerate(["a red circle", "a blue square above a green triangle", "a green square"])]
    engine.start()
    try:
        for r in reqs:
            engine.submit(r)
        assert engine.wait_idle(60)
    finally:
        engine.shutdown()
    assert 16 in seen and set(seen) <= {2, 4, 8, 16}  # 10 real rows ran padded to 16
    from vqdiff.model.io.images import decode_pngs
    from vqdiff.model.sampling.params import image_seed
    from dataclasses import replace

    for i, r in enumerate(reqs):
        alone = sample(model, [r.prompt] * r.n, [replace(r.params, seed=image_seed(r.params.seed, k)) for k in range(r.n)],
                       decode=False).tokens
        assert results[i].images == tuple(decode_pngs(model, alone, batch=1)), f"request {i}"


def test_a_compiled_forward_matches_eager_at_two_buckets(model):
    pytest.importorskip("torch._inductor")
    compiled = BucketedForward(model.transformer, 8, mode="default")
    assert compiled.pad  # compiling always pads: that bounds the shapes
    x, t, kv = inputs(model, ["a red circle", "a blue square", "a green triangle"])  # 6 rows: bucket 8
    with torch.no_grad():
        want = model.transformer(x, t, text_kv=kv)
        got = compiled(x, t, kv)
        again = compiled(x[:2], t[:2], kv[:, :, :2])  # bucket 2: a second graph
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # fused kernels reorder fp32 sums
    torch.testing.assert_close(again, model.transformer(x[:2], t[:2], text_kv=kv[:, :, :2]), rtol=1e-4, atol=1e-4)
