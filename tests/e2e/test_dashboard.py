"""The monitoring files in deploy/ against a live stack: ``promtool`` accepts deploy/prometheus.yml,
and every query of every panel of deploy/grafana/dashboards/vqdiff.json answers with data from a real
Prometheus scraping a real API node and worker (real processes over a real redis-server) after real
traffic. A metric renamed in the server, or a panel naming one that does not exist, fails here."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.scaleout_procs import MODEL, api, tiny_folder, wait_ready, worker
from tests.serving import ROOT, RedisServer, free_port

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "vqdiff.json"
DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
JOBS = {"api": "vqdiff-api", "worker": "vqdiff-worker"}  # the job names of deploy/prometheus.yml
POSITIVE = {"Throughput", "Request latency", "Rows per forward", "Step time"}  # panels that must read > 0
STEPS = 8


def binary(name: str) -> str:
    """Debian's prometheus package ships both binaries; skip without them, or fail under CI (.ci/run
    installs them)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (.ci/run installs the prometheus package)", pytrace=False)
        pytest.skip(f"{name} is not installed (Debian: apt-get install prometheus)")
    return path


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def targets(board: dict) -> list[tuple[str, str]]:
    """(panel title, query) for every target of every panel, Grafana's variables filled in: $model
    by the one model served. Nothing else may remain for Grafana to fill."""
    out = []
    for panel in board["panels"]:
        assert panel.get("targets"), f"panel {panel['title']!r} has no queries"
        for t in panel["targets"]:
            expr = t["expr"].replace("$model", MODEL)
            assert "$" not in expr, f"{panel['title']!r}: a Grafana variable the test does not fill: {expr}"
            out.append((panel["title"], expr))
    return out


def metric_names(text: str) -> set[str]:
    """The vqdiff_* names in a query, or in the sample lines of an exposition."""
    return set(re.findall(r"\bvqdiff_[a-zA-Z0-9_]+", text))


def exposed(text: str) -> set[str]:
    return metric_names("\n".join(line for line in text.splitlines() if not line.startswith("#")))


def test_promtool_accepts_the_deployed_config():
    r = subprocess.run([binary("promtool"), "check", "config", str(DEPLOY / "prometheus.yml")],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = {c["job_name"] for c in yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]}
    assert jobs == set(JOBS.values())


def test_every_panel_uses_the_provisioned_datasource():
    uid = yaml.safe_load(DATASOURCE.read_text())["datasources"][0]["uid"]
    board = dashboard()
    titles = [p["title"] for p in board["panels"]]
    assert len(set(titles)) == len(titles) and POSITIVE <= set(titles), titles
    for p in board["panels"]:
        assert {p["datasource"]["uid"]} | {t["datasource"]["uid"] for t in p["targets"]} == {uid}, p["title"]
    for v in board["templating"]["list"]:
        assert v["datasource"]["uid"] == uid, v["name"]


def scrape_config(ports: dict[str, int]) -> dict:
    """deploy/prometheus.yml with its DNS discovery replaced by the loopback ports, scraping every
    second: the same jobs and relabelling as the compose stack."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    for job in config["scrape_configs"]:
        role = next(r for r, name in JOBS.items() if name == job["job_name"])
        del job["dns_sd_configs"]
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[role]}"]}]
    return config


class Prometheus:
    def __init__(self, tmp: Path, ports: dict[str, int]):
        self.port, self.log = free_port(), tmp / "prometheus.log"
        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config(ports)))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"], stdout=out, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {r.text[:500]}"
        assert body["data"]["resultType"] == "vector", expr
        return body["data"]["result"]

    def value(self, expr: str) -> float:
        """The sum of the query's values, 0 while it has none."""
        return sum(float(s["value"][1]) for s in self.query(expr))

    def wait(self, what: str, ok, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log.read_text()[-3000:]}"
            try:
                if ok():
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{what}: not within {timeout} s\n{self.log.read_text()[-3000:]}"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def traffic(base: str) -> dict[str, int]:
    """36 requests from 6 clients: 24 plain (1 or 2 images), 8 streamed, 4 invalid. Returns what was
    answered: successes, images, invalid."""
    bodies = [{"prompt": ("a red circle", "a blue square above a green triangle")[i % 2], "seed": 100 + i,
               "steps": STEPS, "n": 1 + i % 2} for i in range(24)]
    bodies += [{"prompt": "a green triangle", "seed": 200 + i, "steps": STEPS, "stream": True,
                "preview_every": 2} for i in range(8)]
    bodies += [{"prompt": "a red circle", "steps": -1}, {"prompt": "a", "seed": "x"}, {"prompt": "a", "n": 0},
               {"prompt": "a", "bogus": 1}]
    seen = {"success": 0, "images": 0, "invalid": 0}
    lock = threading.Lock()

    def one(http: httpx.Client, body: dict) -> str:
        if body.get("stream"):
            with http.stream("POST", f"{base}/v1/generate", json=body) as r:
                lines = list(r.iter_lines())
            assert r.status_code == 200 and "event: result" in lines, lines[-5:]
            return "success"
        r = http.post(f"{base}/v1/generate", json=body)
        if r.status_code == 422:
            return "invalid"
        assert r.status_code == 200, r.text[:300]
        return "success"

    errors: list[Exception] = []

    def client(c: int) -> None:
        try:
            with httpx.Client(timeout=60) as http:
                for body in bodies[c::6]:
                    outcome = one(http, body)
                    with lock:
                        seen[outcome] += 1
                        seen["images"] += body.get("n", 1) if outcome == "success" else 0
        except (AssertionError, httpx.HTTPError) as e:  # re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    assert seen["invalid"] == 4 and seen["success"] == 32, seen
    return seen


@pytest.fixture(scope="module")
def folder(tokenizer, tiny_config, tmp_path_factory):
    return tiny_folder(tokenizer, tiny_config, tmp_path_factory.mktemp("model"))


def test_every_panel_query_answers_from_a_live_stack(folder, tmp_path):
    binary("prometheus")
    redis_server = RedisServer(tmp_path).start()
    w, w_ready = worker(tmp_path, "w0", redis_server.url, folder, "--lease-s", "1", "--max-rows", "8")
    node, base = api(tmp_path, redis_server.url)
    roles = [w, node]
    w_base = w_ready.removesuffix("/readyz")
    ports = {"api": int(base.rsplit(":", 1)[1]), "worker": int(w_base.rsplit(":", 1)[1])}
    prom = Prometheus(tmp_path, ports)
    try:
        wait_ready(w_ready, roles, "the worker")
        wait_ready(f"{base}/readyz", roles, "the API node")
        prom.wait("both targets up", lambda: prom.value('up{job=~"vqdiff-.*"}') == 2)
        api_ok = f'sum(vqdiff_requests_total{{job="{JOBS["api"]}", outcome="success"}})'
        images = f'sum(vqdiff_images_total{{job="{JOBS["worker"]}"}})'

        def scraped(successes: int, n_images: int) -> bool:
            return prom.value(api_ok) == successes and prom.value(images) == n_images

        # One request first, scraped: the histograms' series exist from its first observation on, so
        # rate() over them is > 0 only if a sample precedes the rest of the traffic, however fast.
        warm = httpx.post(f"{base}/v1/generate", json={"prompt": "a red circle", "steps": STEPS}, timeout=60)
        assert warm.status_code == 200, warm.text[:300]
        prom.wait("the first request scraped", lambda: scraped(1, 1))
        t0 = time.monotonic()
        seen = traffic(base)
        took = time.monotonic() - t0
        prom.wait("the final counts scraped", lambda: scraped(1 + seen["success"], 1 + seen["images"]))

        board = dashboard()
        empty, not_positive = [], []
        for title, expr in targets(board):
            series = prom.query(expr)
            if not series:
                empty.append((title, expr))
            elif title in POSITIVE and not all(float(s["value"][1]) > 0 for s in series):
                not_positive.append((title, expr, [s["value"][1] for s in series]))
        assert not empty, f"panel queries with no series: {empty}"
        assert not not_positive, f"panel queries not > 0 after traffic: {not_positive}"

        # every metric a panel (or the $model variable) names is in a live exposition; one that
        # filters by job, in that job's
        live = {role: exposed(httpx.get(f"{url}/metrics", timeout=10).text)
                for role, url in (("api", base), ("worker", w_base))}
        queries = [e for _, e in targets(board)] + [v["definition"] for v in board["templating"]["list"]]
        for expr in queries:
            missing = metric_names(expr) - live["api"] - live["worker"]
            assert not missing, f"{expr}: no such metric exposed: {missing}"
            for role, job in JOBS.items():
                if f'job="{job}"' in expr:
                    assert metric_names(expr) <= live[role], f"{expr}: not exposed by {job}"
        print(f"{len(queries)} queries answered; traffic {seen} in {took:.1f} s")
    finally:
        prom.stop()
        for role in roles:
            role.kill()
        redis_server.stop()
