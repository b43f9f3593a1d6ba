"""SIGTERM with more work than the grace period allows, on a real ``vqdiff serve`` process: what
finishes in time is answered 200, everything else 503 with the envelope and Retry-After (a final
``error`` event on a stream, UNAVAILABLE on gRPC), no answer is cut off, and the process exits 0
within the grace period plus a small bound."""

from __future__ import annotations

import json
import signal
import threading
import time

import grpc
import httpx
import torch

from vqdiff.model.io.folder import random_model, save_model
from vqdiff.server.proto_gen.vqdiff.v1 import generate_pb2 as pb
from vqdiff.server.proto_gen.vqdiff.v1 import generate_pb2_grpc
from tests.serving import serve_process
GRACE_S = 1.5
BOUND_S = 3.0  # server/main.py: the step in progress + ANSWER_S (2 s) + teardown


def gauge(url: str, name: str, label: str = "") -> float:
    line = next(x for x in httpx.get(f"{url}/metrics").text.splitlines() if x.startswith(name + "{") and label in x)
    return float(line.rsplit(" ", 1)[1])


def sse_events(r: httpx.Response) -> list[tuple[str, dict]]:
    events, kind = [], None
    for line in r.iter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[6:])))  # a chunk cut mid-way fails to parse here
    return events


def test_past_the_grace_period_every_request_gets_a_clean_answer(tokenizer, tiny_config, tmp_path):
    model = random_model(tiny_config, tokenizer, seed=3).eval()
    with torch.no_grad():
        model.transformer.out.weight.mul_(40.0)
    folder = save_model(model, tmp_path / "tiny")
    proc, url, grpc_port = serve_process(folder, "--max-rows", "8", "--grace-s", str(GRACE_S))
    # 16 requests of 4 images, one batch of 8 rows at a time: ~0.3 s each on a CPU, far past the grace
    body = {"prompt": "a red circle", "sampler": "posterior", "steps": 100, "n": 4}
    plain, streams, rpcs = [], [], []
    try:
        stub = generate_pb2_grpc.ImageGenerationStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))

        def http_client(i: int) -> None:
            plain.append(httpx.post(f"{url}/v1/generate", json={**body, "seed": i}, timeout=120))

        def sse_client(i: int) -> None:
            with httpx.stream("POST", f"{url}/v1/generate", json={**body, "seed": i, "stream": True},
                              timeout=120) as r:
                streams.append((r.status_code, sse_events(r)))

        def grpc_client(i: int, stream: bool) -> None:
            msg = pb.GenerateRequest(prompt=body["prompt"], sampler=pb.SAMPLER_POSTERIOR, steps=100, n=4, seed=i)
            try:
                if stream:
                    out = list(stub.GenerateStream(msg, timeout=120))
                    assert out[-1].HasField("result")
                else:
                    stub.Generate(msg, timeout=120)
                rpcs.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                rpcs.append((e.code(), e.details()))

        clients = ([threading.Thread(target=http_client, args=(i,)) for i in range(8)]
                   + [threading.Thread(target=sse_client, args=(10 + i,)) for i in range(4)]
                   + [threading.Thread(target=grpc_client, args=(20 + i, i % 2 == 1)) for i in range(4)])
        for t in clients:
            t.start()
        while (gauge(url, "vqdiff_requests_total", 'outcome="success"') + gauge(url, "vqdiff_requests_running")
               + gauge(url, "vqdiff_requests_waiting")) < len(clients):
            time.sleep(0.01)

        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        code = proc.wait(GRACE_S + 30)
        stopped_s = time.monotonic() - t0
        for t in clients:
            t.join(30)
        log = proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()

    assert code == 0, log[-3000:]
    assert stopped_s <= GRACE_S + BOUND_S, f"stopped {stopped_s:.2f} s after SIGTERM (grace {GRACE_S} s)"
    assert len(plain) == 8 and len(streams) == 4 and len(rpcs) == 4

    refused = 0
    for r in plain:
        if r.status_code == 200:
            assert len(r.json()["images"]) == 4
            continue
        refused += 1
        assert r.status_code == 503 and r.headers["content-type"].startswith("application/json"), (r.status_code, r.text)
        assert r.json()["error"]["code"] == "unavailable" and int(r.headers["retry-after"]) >= 1
    for status, events in streams:
        assert status == 200 and events[0][0] == "queued"
        kind, data = events[-1]
        assert kind in ("result", "error"), events[-1]
        if kind == "error":
            refused += 1
            assert data["error"]["code"] == "unavailable", data
    for outcome in rpcs:
        if outcome != grpc.StatusCode.OK:
            refused += 1
            assert outcome[0] == grpc.StatusCode.UNAVAILABLE, outcome
    assert refused > 0, "16 requests of ~0.3 s each should outlast a 1.5 s grace period"
    assert "grace period over" in log and "stopped" in log
