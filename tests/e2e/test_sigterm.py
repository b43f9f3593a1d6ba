"""SIGTERM on a real ``vqdiff serve`` process: readiness turns 503 and gRPC health NOT_SERVING, new
requests are refused, accepted ones finish within the grace period, and the process exits 0."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import httpx
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vqdiff.model.io.folder import random_model, save_model
from tests.serving import serve_process


def test_sigterm_drains_and_exits_zero(tokenizer, tiny_config, tmp_path):
    model = random_model(tiny_config, tokenizer, seed=3).eval()
    with torch.no_grad():
        model.transformer.out.weight.mul_(40.0)
    folder = save_model(model, tmp_path / "tiny")
    proc, url, grpc_port = serve_process(folder, "--max-rows", "8", "--grace-s", "60")
    try:
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING

        # 12 accepted requests of 4 images each; one fits a batch of 8 rows at a time, so most are queued
        results: list[httpx.Response] = []
        body = {"prompt": "a red circle", "sampler": "posterior", "steps": 100, "n": 4}

        def client(i: int) -> None:
            results.append(httpx.post(f"{url}/v1/generate", json={**body, "seed": i}, timeout=120))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        def gauge(name: str, label: str = "") -> float:
            line = next(x for x in httpx.get(f"{url}/metrics").text.splitlines()
                        if x.startswith(name + "{") and label in x)
            return float(line.rsplit(" ", 1)[1])

        # every request accepted (finished, running or queued) before the signal
        while (gauge("vqdiff_requests_total", 'outcome="success"') + gauge("vqdiff_requests_running")
               + gauge("vqdiff_requests_waiting")) < 12:
            time.sleep(0.01)

        proc.send_signal(signal.SIGTERM)
        while httpx.get(f"{url}/readyz").status_code == 200:
            time.sleep(0.01)
        assert httpx.get(f"{url}/readyz").status_code == 503
        late = httpx.post(f"{url}/v1/generate", json={"prompt": "late"})
        assert late.status_code == 503 and late.json()["error"]["code"] == "unavailable"
        status = health.Check(health_pb2.HealthCheckRequest(service="")).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING

        for t in threads:
            t.join(120)
        assert proc.wait(60) == 0
        log = proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(results) == 12 and all(r.status_code == 200 for r in results), [r.status_code for r in results]
    assert "draining" in log and "stopped" in log
