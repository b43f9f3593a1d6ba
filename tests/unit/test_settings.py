"""Server settings: one name each (field x_y, flag --x-y, variable VQDIFF_X_Y), defaults, variables,
flags over both, unknown variables refused, loud bad values."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from vqdiff.server.settings import OTHER_VARIABLES, Settings, from_args
from vqdiff.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]

# a valid value, not the default, for every setting, as typed on a command line
SAMPLE = {
    "model": "/m", "host": "127.0.0.1", "http_port": "8001", "grpc_port": "0", "device": "cuda:1",
    "dtype": "bf16", "max_rows": "16", "max_waiting": "3", "max_images": "2", "max_prompt_chars": "10", "max_upload_bytes": "2048",
    "request_timeout_s": "2.5", "preview_every": "4", "heartbeat_s": "0.5", "grace_s": "0",
    "decode_workers": "3", "decode_batch": "4", "intra_op_threads": "1", "omp_wait_policy": "active", "compile": "default", "warmup": "false",
    "api_keys": "a, b,", "role": "worker", "redis_url": "redis://127.0.0.1:6380/1", "worker_name": "w1",
    "lease_s": "1.5", "max_deliveries": "5", "worker_port": "9001",
}


def serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def serve_help(capsys) -> str:
    with pytest.raises(SystemExit):
        serve_args("--help")
    return capsys.readouterr().out


def test_every_setting_is_a_flag_and_a_variable_of_the_same_name(capsys):
    names = [f.name for f in fields(Settings)]
    assert sorted(SAMPLE) == sorted(names), "a new setting needs a sample value here"
    help = serve_help(capsys)
    flags = set(re.findall(r"^\s+(--[a-z0-9-]+)", help, re.M)) - {"--help"}
    assert flags == {"--" + n.replace("_", "-") for n in names}  # every flag is a setting, and back
    for n in names:
        flag, var = "--" + n.replace("_", "-"), "VQDIFF_" + n.upper()
        assert f"${var}" in help
        by_flag, by_var = from_args(serve_args(flag, SAMPLE[n]), env={}), Settings.from_env({var: SAMPLE[n]})
        assert getattr(by_flag, n) == getattr(by_var, n) != getattr(Settings(), n), n


def test_old_flag_names_and_abbreviations_are_gone():
    for argv in (["--port", "8001"], ["--grace", "3"], ["--request-timeout", "3"], ["--max-row", "8"]):
        with pytest.raises(SystemExit):
            serve_args(*argv)


def test_environment_then_flags():
    env = {"VQDIFF_MAX_ROWS": "16", "VQDIFF_API_KEYS": "a, b,", "VQDIFF_MODEL": "/m", "VQDIFF_REQUEST_TIMEOUT_S": "2.5",
           "VQDIFF_GRPC_PORT": "0"}
    s = Settings.from_env(env)
    assert (s.max_rows, s.api_keys, s.model, s.request_timeout_s, s.grpc_port) == (16, ("a", "b"), Path("/m"), 2.5, 0)
    assert s.max_images == 8 and Settings(max_rows=6).max_images == 3  # follows the row budget
    s = Settings.from_env(env, max_rows=4, api_keys=["k"], http_port=None)
    assert s.max_rows == 4 and s.api_keys == ("k",) and s.http_port == 8000
    s = from_args(serve_args("--max-rows", "8", "--api-keys", "x"), env=env)
    assert (s.max_rows, s.api_keys, s.request_timeout_s, s.max_images) == (8, ("x",), 2.5, 4)


def test_new_settings_defaults():
    s = Settings()
    assert (s.decode_batch, s.intra_op_threads, s.omp_wait_policy) == (1, 0, "passive")


@pytest.mark.parametrize("key, closest", [
    ("VQDIFF_MAX_ROW", "VQDIFF_MAX_ROWS"),
    ("VQDIFF_GRACE", "VQDIFF_GRACE_S"),
    ("VQDIFF_REQUEST_TIMEOUT", "VQDIFF_REQUEST_TIMEOUT_S"),
    ("VQDIFF_KERNEL", "VQDIFF_KERNELS"),
    ("vqdiff_max_rows", "VQDIFF_MAX_ROWS"),  # one spelling: upper case
])
def test_unknown_variables_are_refused_with_the_closest_name(key, closest):
    with pytest.raises(ValueError, match=f"^{key}: no such setting; did you mean {closest}\\?"):
        Settings.from_env({key: "8"})


def test_project_variables_that_are_not_settings_pass():
    assert set(OTHER_VARIABLES) == {"VQDIFF_KERNELS", "VQDIFF_PIP_ARGS", "VQDIFF_EXTRAS", "VQDIFF_TORCH_INDEX",
                                    "VQDIFF_DEFAULT_MODEL", "VQDIFF_WORKERS", "VQDIFF_REDIS_IMAGE",
                                    "VQDIFF_PROMETHEUS_IMAGE", "VQDIFF_GRAFANA_IMAGE"}
    env = {"VQDIFF_KERNELS": "torch", "VQDIFF_PIP_ARGS": "", "VQDIFF_EXTRAS": "test", "OTHER_THING": "x"}
    assert Settings.from_env(env) == Settings()


def test_the_deployment_files_use_only_names_the_server_accepts():
    """What the image, compose files and kernels read or set must pass the start-up check, and every
    allow-listed name must still be used somewhere."""
    known = {"VQDIFF_" + f.name.upper() for f in fields(Settings)} | set(OTHER_VARIABLES)
    files = [ROOT / "Dockerfile", ROOT / "docker-compose.yml", ROOT / "kernels" / "__init__.py",
             *sorted(f for f in (ROOT / "deploy").rglob("*") if f.is_file())]
    used = set()
    for f in files:
        used |= set(re.findall(r"VQDIFF_[A-Z0-9_]*[A-Z0-9]", f.read_text()))
    assert used - known == set()
    assert set(OTHER_VARIABLES) <= used


@pytest.mark.parametrize("env, name", [
    ({"VQDIFF_MAX_ROWS": "lots"}, "VQDIFF_MAX_ROWS: 'lots'"),
    ({"VQDIFF_MAX_ROWS": "7"}, "VQDIFF_MAX_ROWS: 7"),
    ({"VQDIFF_HTTP_PORT": "70000"}, "VQDIFF_HTTP_PORT: 70000"),
    ({"VQDIFF_DTYPE": "fp8"}, "VQDIFF_DTYPE: 'fp8'"),
    ({"VQDIFF_MAX_ROWS": "4", "VQDIFF_MAX_IMAGES": "3"}, "VQDIFF_MAX_IMAGES: 3"),
    ({"VQDIFF_REQUEST_TIMEOUT_S": "0"}, "VQDIFF_REQUEST_TIMEOUT_S: 0.0"),
    ({"VQDIFF_GRACE_S": "soon"}, "VQDIFF_GRACE_S: 'soon'"),
    ({"VQDIFF_DECODE_BATCH": "0"}, "VQDIFF_DECODE_BATCH: 0"),
    ({"VQDIFF_INTRA_OP_THREADS": "-1"}, "VQDIFF_INTRA_OP_THREADS: -1"),
    ({"VQDIFF_OMP_WAIT_POLICY": "spin"}, "VQDIFF_OMP_WAIT_POLICY: 'spin'"),
])
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(ValueError, match=f"^{re.escape(name)} is not allowed; expected "):
        Settings.from_env(env)


@pytest.mark.parametrize("argv, message", [
    (["--max-rows", "7"], "--max-rows: 7 is not allowed"),
    (["--http-port", "x"], "--http-port: 'x' is not allowed; expected an integer"),
    (["--decode-batch", "0"], "--decode-batch: 0 is not allowed"),
    (["--max-images", "33"], "--max-images: 33 is not allowed; expected 1..max_rows/2 (32)"),
])
def test_bad_flags_name_the_flag(argv, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        from_args(serve_args(*argv), env={})


def _serve(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("VQDIFF_")}
    return subprocess.run([sys.executable, "-m", "vqdiff.cli", "serve", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**clean, **env})


def test_vqdiff_serve_refuses_a_misspelt_variable_in_one_line():
    r = _serve([], {"VQDIFF_MAX_ROW": "8"})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [r.stderr.strip()]  # one line, no traceback
    assert r.stderr.startswith("vqdiff serve: error: VQDIFF_MAX_ROW: no such setting; did you mean VQDIFF_MAX_ROWS?")


def test_vqdiff_serve_refuses_a_misspelt_flag():
    r = _serve(["--max-row", "8"], {})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1] == "vqdiff serve: error: unrecognized argument --max-row: did you mean --max-rows?"
    r = _serve(["--no-such-thing"], {})  # nothing close: argparse's own message
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == "vqdiff: error: unrecognized arguments: --no-such-thing"


def test_bad_settings_fail_before_torch_loads():
    """Start-up checks cost nothing: the settings are refused before torch (and the model) load."""
    code = "import sys; from vqdiff.cli import main; rc = main(['serve']); print(rc, 'torch' in sys.modules)"
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("VQDIFF_")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**clean, "VQDIFF_MAX_ROWS": "7"})
    assert r.stdout.split() == ["2", "False"], r.stderr
    assert r.stderr.strip() == "vqdiff serve: error: VQDIFF_MAX_ROWS: 7 is not allowed; expected an even number >= 2"


def test_readme_lists_every_setting():
    serving = (ROOT / "README.md").read_text().split("## Serving", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([a-z0-9_]+)` \|", serving, re.M)
    assert listed == [f.name for f in fields(Settings)]
