"""The start-up warm-up: a fault on the serving path stops the start, loudly, before a port opens."""

from __future__ import annotations

import pytest

import vqdiff.model.sampling.sampler as sampler_module
from vqdiff.model.io.folder import random_model
from vqdiff.server.main import Server
from vqdiff.server.settings import Settings
from vqdiff.server.warmup import WarmupFailed, warm_up


@pytest.fixture(scope="module")
def model(tokenizer, tiny_config):
    return random_model(tiny_config, tokenizer, seed=3).eval()


def test_the_warm_up_draws_through_the_serving_path(model, monkeypatch):
    calls = []
    real = sampler_module.advance
    monkeypatch.setattr(sampler_module, "advance", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert warm_up(model) > 0
    assert len(calls) == 2  # two steps: forward + step kernels, then the decode


def test_a_fault_on_the_serving_path_stops_the_start(model, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("triton: failed to compile the driver (no C compiler)")

    monkeypatch.setattr(sampler_module, "advance", broken)
    with pytest.raises(WarmupFailed, match="no C compiler.*--warmup false"):
        Server(Settings(grpc_port=0), model=model)
    Server(Settings(grpc_port=0, warmup=False), model=model).engine.shutdown()  # the way around it


def test_the_warmup_setting_parses_like_every_other():
    assert Settings.from_env({"VQDIFF_WARMUP": "false"}).warmup is False
    assert Settings.from_env({}, warmup="on").warmup is True
    with pytest.raises(ValueError, match="VQDIFF_WARMUP: 'maybe' is not allowed; expected true | false"):
        Settings.from_env({"VQDIFF_WARMUP": "maybe"})
