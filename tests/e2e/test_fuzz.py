"""A fuzz pass over the OpenAPI schema (schemathesis, hypothesis underneath) against the real server:
whatever the body, the answer is never a 5xx, and every error uses the one envelope."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vqdiff.model.io.folder import random_model
from tests.serving import ServerThread

schemathesis = pytest.importorskip("schemathesis")


@pytest.fixture(scope="module")
def server(tokenizer, tiny_config):
    model = random_model(tiny_config, tokenizer, seed=3).eval()
    model.generation_defaults = {"steps": 2}  # valid bodies generate; keep each one cheap
    with torch.no_grad():
        model.transformer.out.weight.mul_(40.0)
    # small queue: fuzzed concurrency must see 429s, never 5xx
    with ServerThread(model, max_rows=8, max_images=4, request_timeout_s=30) as s:
        yield s


def test_no_input_gives_a_5xx(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/generate", "POST /v1/images/generations"}
    # valid bodies (they generate) and invalid ones (wrong types, missing and extra fields)
    cases = st.one_of([op.as_strategy(mode) for op in operations for mode in schemathesis.GenerationMode])

    @given(case=cases)
    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        response = case.call(base_url=server.url, timeout=60)
        assert response.status_code < 500, (case.operation.label, case.body, response.status_code, response.text[:300])
        if response.status_code >= 400 and "json" in str(response.headers.get("content-type")):
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]

    check()
