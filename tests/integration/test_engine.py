"""The engine with the tiny random model: batching changes no result, faults stay in their request,
cancellation and deadlines free the batch, shutdown drains, and the metrics count what happened."""

from __future__ import annotations

import io
import queue
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import vqdiff.server.engine as engine_module
from vqdiff.model.io.folder import random_model
from vqdiff.model.sampling.params import GenerationParams
from vqdiff.model.sampling.sampler import batch_text_kv, forward_rows, sample
from vqdiff.server.engine import Engine
from vqdiff.model.io.images import decode_pngs
from vqdiff.server.request import Failure, Progress, Request, Result, Status
from vqdiff.server.scheduler import Draining, QueueFull
from vqdiff.server.settings import Settings


@pytest.fixture(scope="module")
def model(tokenizer, tiny_config):
    m = random_model(tiny_config, tokenizer, seed=3).eval()
    with torch.no_grad():  # confident, varied predictions (as in test_sampler)
        m.transformer.out.weight.mul_(40.0)
        m.null_cond.embeddings.normal_()
    return m


@pytest.fixture
def make_engine(model):
    engines = []

    def make(**kw) -> Engine:
        kw = {"max_rows": 16, "max_images": 4, **kw}
        e = Engine(model, Settings(**kw)).start()
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.shutdown(0)


def submit(engine: Engine, prompt: str, **kw) -> tuple[Request, queue.Queue]:
    q: queue.Queue = queue.Queue()
    n, preview_every, timeout_s = kw.pop("n", 1), kw.pop("preview_every", 0), kw.pop("timeout_s", None)
    r = Request(prompt=prompt, params=GenerationParams(**kw), n=n, preview_every=preview_every, emit=q.put,
                timeout_s=timeout_s)
    return engine.submit(r), q


def events(q: queue.Queue, timeout: float = 60) -> list:
    out = []
    while not out or isinstance(out[-1], Progress):
        out.append(q.get(timeout=timeout))
    return out


def wait_running(engine: Engine, req: Request, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while req not in engine.scheduler.running:
        assert time.monotonic() < end, "the request was never admitted"
        time.sleep(0.005)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def alone(model, prompt: str, n: int = 1, **kw) -> list[np.ndarray]:
    """The images of the request run on its own: its tokens, each grid decoded on its own (as the
    engine decodes with decode_batch=1), so a served image must equal these bit for bit."""
    params = [GenerationParams(**{**kw, "seed": kw["seed"] + i}) for i in range(n)]
    tokens = sample(model, [prompt] * n, params, decode=False).tokens  # (n, N)
    return [pixels(png) for png in decode_pngs(model, tokens, batch=1)]


def counter(engine: Engine, metric, *labels) -> float:
    return metric.labels(engine.model_name, *labels)._value.get()


MIXED = [
    ("a red circle", dict(steps=6, seed=11, sampler="purity", guidance_scale=3.0)),
    ("a blue square", dict(steps=9, seed=12, sampler="random", guidance_scale=1.0, n=2)),
    ("a green triangle above a red circle", dict(steps=5, seed=13, sampler="skip", truncation_rate=0.8)),
    ("the circle", dict(steps=7, seed=14, sampler="purity", purity_weight=3.0, n=3)),
    ("a square", dict(steps=100, seed=15, sampler="posterior", guidance_scale=2.0)),
    ("left of the triangle", dict(steps=4, seed=16, uncond="empty", guidance_scale=4.0)),
]


def test_concurrent_mixed_requests_each_equal_the_request_alone(make_engine, model):
    engine = make_engine(max_rows=10)  # fewer rows than all requests: some wait and join later
    subs = []
    for i, (prompt, kw) in enumerate(MIXED):
        subs.append((prompt, dict(kw), *submit(engine, prompt, **kw)))
        if i == 2:
            time.sleep(0.05)  # the rest arrive while the first ones are stepping
    for prompt, kw, req, q in subs:
        result = events(q)[-1]
        assert isinstance(result, Result), result
        n = kw.pop("n", 1)
        assert result.seeds == tuple(kw["seed"] + i for i in range(n))
        for got, want in zip(result.images, alone(model, prompt, n, **kw), strict=True):
            np.testing.assert_array_equal(pixels(got), want)
    assert counter(engine, engine.metrics.requests, "success") == len(MIXED)
    assert counter(engine, engine.metrics.images) == sum(kw.get("n", 1) for _, kw in MIXED)
    # rows per forward never exceeded the budget, and some forward carried several requests
    samples = {s.labels["le"]: s.value for s in engine.metrics.rows.collect()[0].samples if s.name.endswith("_bucket")}
    assert samples["16.0"] == samples["+Inf"]  # every forward had <= 10 rows (the 16 bucket holds them all)
    assert samples["2.0"] < samples["+Inf"]  # and not all were single-image forwards


def test_previews_arrive_in_order_every_k_steps_then_the_result(make_engine):
    engine = make_engine()
    _, q = submit(engine, "a red circle", steps=8, seed=1, preview_every=3, n=2)
    evs = events(q)
    assert [e.step for e in evs[:-1]] == [3, 6]
    assert all(e.total == 8 and len(e.previews) == 2 for e in evs[:-1])
    assert evs[0].unmasked < evs[1].unmasked < 1.0
    assert all(pixels(p).shape == (16, 16, 3) for e in evs[:-1] for p in e.previews)
    assert isinstance(evs[-1], Result)
    assert engine.metrics.label(engine.metrics.first_preview)._sum.get() > 0


def test_metrics_count_forwards_and_rows_exactly(make_engine):
    engine = make_engine()
    _, q = submit(engine, "a red circle", steps=5, seed=2, n=3)
    assert isinstance(events(q)[-1], Result)
    assert counter(engine, engine.metrics.forwards) == 5
    assert engine.metrics.label(engine.metrics.rows)._sum.get() == 5 * 6  # 3 images x (cond + uncond)
    assert engine.metrics.label(engine.metrics.latency)._sum.get() > 0


def test_invalid_requests_are_refused_with_the_field_named(make_engine):
    engine = make_engine()
    with pytest.raises(ValueError, match="steps: 65"):
        submit(engine, "a", steps=65, seed=0)  # 64 tokens: at most 64 selection steps
    with pytest.raises(ValueError, match="n: 5"):
        submit(engine, "a", steps=2, n=5)
    with pytest.raises(ValueError, match="prompt"):
        submit(engine, "a" * 5000, steps=2)
    assert counter(engine, engine.metrics.requests, "invalid") == 3
    assert engine.scheduler.idle


def test_queue_full_refuses_without_disturbing_the_running_request(make_engine, model):
    engine = make_engine(max_rows=2, max_images=1, max_waiting=1)
    first, q1 = submit(engine, "a red circle", steps=100, seed=5, sampler="posterior")
    wait_running(engine, first)
    _, q2 = submit(engine, "a blue square", steps=3, seed=6)
    with pytest.raises(QueueFull):
        submit(engine, "a green triangle", steps=3, seed=7)
    assert counter(engine, engine.metrics.requests, "rejected") == 1
    r1, r2 = events(q1)[-1], events(q2)[-1]
    np.testing.assert_array_equal(pixels(r1.images[0]), alone(model, "a red circle", steps=100, seed=5,
                                                              sampler="posterior")[0])
    assert isinstance(r2, Result)


def test_cancel_frees_the_slot_within_one_step(make_engine):
    engine = make_engine(max_rows=2, max_images=1)
    long_req, q1 = submit(engine, "a red circle", steps=100, seed=5, sampler="posterior")
    _, q2 = submit(engine, "a blue square", steps=3, seed=6)
    wait_running(engine, long_req)
    assert engine.scheduler.running == [long_req]
    before = counter(engine, engine.metrics.forwards)
    engine.cancel(long_req)
    failure = events(q1)[-1]
    assert isinstance(failure, Failure) and failure.status == Status.FINISHED_CANCELLED
    assert isinstance(events(q2)[-1], Result)
    # the cancelled request ran at most the one step already in flight; the other ran its 3
    assert counter(engine, engine.metrics.forwards) - before <= 1 + 3
    assert counter(engine, engine.metrics.requests, "cancelled") == 1


def test_deadline_fails_the_request_and_frees_the_batch(make_engine):
    engine = make_engine()
    _, q = submit(engine, "a red circle", steps=100, seed=5, sampler="posterior", timeout_s=0.05)
    failure = events(q)[-1]
    assert isinstance(failure, Failure) and failure.status == Status.FINISHED_DEADLINE
    assert counter(engine, engine.metrics.requests, "deadline") == 1
    assert engine.wait_idle(5)


def corrupt_text_kv(monkeypatch, prompt: str, corrupt) -> None:
    """Admission gives requests with this prompt corrupted cached text keys/values."""
    real_start = engine_module.start

    def start(m, prompts, params, inits=None):
        states = real_start(m, prompts, params, inits)
        for p, s in zip(prompts, states):
            if p == prompt:
                s.text_kv = corrupt(s.text_kv)
        return states

    monkeypatch.setattr(engine_module, "start", start)


def test_a_request_with_non_finite_values_fails_alone(make_engine, model, monkeypatch):
    corrupt_text_kv(monkeypatch, "poison", lambda kv: torch.full_like(kv, float("nan")))
    engine = make_engine()
    _, bad = submit(engine, "poison", steps=4, seed=1)
    _, good = submit(engine, "a red circle", steps=4, seed=2)
    failure, result = events(bad)[-1], events(good)[-1]
    assert isinstance(failure, Failure) and failure.status == Status.FINISHED_FAILED
    assert "non-finite" in failure.message
    np.testing.assert_array_equal(pixels(result.images[0]), alone(model, "a red circle", steps=4, seed=2)[0])


def test_a_step_that_raises_is_bisected_so_only_the_bad_request_fails(make_engine, model, monkeypatch):
    corrupt_text_kv(monkeypatch, "broken", lambda kv: kv[..., :-1])  # a wrong shape: any forward with it raises
    engine = make_engine()
    subs = [submit(engine, p, steps=4, seed=i) for i, p in enumerate(["a red circle", "broken", "a blue square"])]
    outcomes = [events(q)[-1] for _, q in subs]
    assert isinstance(outcomes[1], Failure) and "step failed" in outcomes[1].message
    assert isinstance(outcomes[0], Result) and isinstance(outcomes[2], Result)
    assert counter(engine, engine.metrics.retries) >= 1
    np.testing.assert_array_equal(pixels(outcomes[2].images[0]), alone(model, "a blue square", steps=4, seed=2)[0])


def same_kv(text_kv, states) -> bool:
    """``text_kv`` is the batch's own k/v rebuilt from its states, then only zero padding rows
    (the engine pads to its row bucket when its forward is compiled)."""
    rows = forward_rows(states)
    return torch.equal(text_kv[:, :, :rows], batch_text_kv(states)) and not text_kv[:, :, rows:].any()


def test_out_of_memory_retries_at_a_smaller_batch_with_the_same_results(make_engine, model, monkeypatch):
    real_advance = engine_module.advance

    def small_memory_advance(transformer, schedule, states, text_kv=None, forward=None):
        if len(states) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated: more than 2 images)")
        return real_advance(transformer, schedule, states, text_kv, forward=forward)

    monkeypatch.setattr(engine_module, "advance", small_memory_advance)
    engine = make_engine()
    subs = [submit(engine, p, steps=5, seed=i) for i, p in enumerate(["a red circle", "a blue square", "the circle"])]
    for (_, q), (i, p) in zip(subs, enumerate(["a red circle", "a blue square", "the circle"])):
        result = events(q)[-1]
        assert isinstance(result, Result)
        np.testing.assert_array_equal(pixels(result.images[0]), alone(model, p, steps=5, seed=i)[0])
    assert counter(engine, engine.metrics.retries) >= 1


def test_decode_failure_fails_the_request_and_the_engine_keeps_serving(make_engine, model, monkeypatch):
    engine = make_engine()
    real_decode = model.decode
    monkeypatch.setattr(model, "decode", lambda tokens: torch.full((len(tokens), 3, 16, 16), float("nan")))
    _, q = submit(engine, "a red circle", steps=3, seed=1)
    failure = events(q)[-1]
    assert isinstance(failure, Failure) and "decoding failed" in failure.message
    monkeypatch.setattr(model, "decode", real_decode)
    _, q = submit(engine, "a red circle", steps=3, seed=1)
    assert isinstance(events(q)[-1], Result)
    assert counter(engine, engine.metrics.requests, "failed") == 1


def test_shutdown_drains_within_the_grace_period_then_fails_the_rest(model):
    engine = Engine(model, Settings(max_rows=2, max_images=1)).start()
    _, q1 = submit(engine, "a red circle", steps=3, seed=1)
    _, q2 = submit(engine, "a blue square", steps=100, seed=2, sampler="posterior")
    _, q3 = submit(engine, "the circle", steps=100, seed=3, sampler="posterior")
    stopper = threading.Thread(target=engine.shutdown, args=(0.5,))
    stopper.start()
    time.sleep(0.05)
    assert not engine.ready
    with pytest.raises(Draining):
        submit(engine, "late", steps=2)
    stopper.join(30)
    assert not stopper.is_alive()
    outcomes = [events(q)[-1] for q in (q1, q2, q3)]
    assert isinstance(outcomes[0], Result)
    # every accepted request got exactly one final event: a result or "unavailable"
    assert all(isinstance(o, Result) or o.status == Status.FINISHED_UNAVAILABLE for o in outcomes)
    assert q1.empty() and q2.empty() and q3.empty()


PROMPTS = ["a red circle", "a blue square", "a green triangle above a red circle", "the square left of the circle"]


def test_300_sequential_requests_are_each_drawn_from_their_own_prompt(make_engine, model, monkeypatch):
    """One request at a time, prompts alternating: each batch is new, and its text keys/values must
    be its own (a cache keyed by the id() of freed objects once ran requests on the previous text)."""
    checked = []
    real_advance = engine_module.advance

    def advance(transformer, schedule, states, text_kv=None, forward=None):
        # the k/v the engine hands over must be the batch's own, rebuilt from scratch
        checked.append(text_kv is None or same_kv(text_kv, states))
        return real_advance(transformer, schedule, states, text_kv=text_kv, forward=forward)

    monkeypatch.setattr(engine_module, "advance", advance)
    engine = make_engine()
    for i in range(300):
        prompt = PROMPTS[i % len(PROMPTS)]
        _, q = submit(engine, prompt, steps=2, seed=1000 + i)
        result = events(q)[-1]
        assert isinstance(result, Result), (i, result)
        np.testing.assert_array_equal(pixels(result.images[0]), alone(model, prompt, steps=2, seed=1000 + i)[0],
                                      err_msg=f"request {i} ({prompt!r})")
    assert len(checked) == 600 and all(checked)


def test_batch_text_kv_is_rebuilt_whenever_membership_changes(make_engine, monkeypatch):
    """Requests joining and leaving a running batch: every forward's text k/v equals the one
    rebuilt from the states it steps."""
    mismatches, calls = [], []
    real_advance = engine_module.advance

    def advance(transformer, schedule, states, text_kv=None, forward=None):
        calls.append(len(states))
        if text_kv is not None and not same_kv(text_kv, states):
            mismatches.append(len(calls))
        return real_advance(transformer, schedule, states, text_kv=text_kv, forward=forward)

    monkeypatch.setattr(engine_module, "advance", advance)
    engine = make_engine(max_rows=8)
    queues = []
    for i in range(24):
        queues.append(submit(engine, PROMPTS[i % 4], steps=2 + i % 5, seed=i, n=1 + i % 2)[1])
        if i % 6 == 5:
            time.sleep(0.02)
    assert all(isinstance(events(q)[-1], Result) for q in queues)
    assert len(set(calls)) > 1 and not mismatches  # membership changed, and the k/v always followed
