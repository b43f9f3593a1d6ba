"""The CPU thread policy (server/threads.py): the auto thread count, torch.set_num_threads at start-up,
and OMP_WAIT_POLICY reaching libgomp when `vqdiff serve` sets it before torch loads."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vqdiff.server import threads
from vqdiff.server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cpus, decode_workers, expected", [(2, 2, 1), (16, 2, 14), (1, 4, 1), (8, 1, 7)])
def test_auto_rule(cpus, decode_workers, expected):
    assert threads.auto_threads(decode_workers, cpus) == expected


def test_auto_rule_on_this_machine():
    cpus = threads.available_cpus()
    assert 1 <= cpus <= len(os.sched_getaffinity(0))
    assert threads.auto_threads(2) == max(1, cpus - 2) >= 1


def test_apply_sets_torch_threads(torch_threads, caplog):
    with caplog.at_level(logging.INFO, logger="vqdiff.server"):
        assert threads.apply(Settings(intra_op_threads=3)) == 3
        assert torch.get_num_threads() == 3
        auto = threads.apply(Settings(intra_op_threads=0, decode_workers=1))
    assert auto == threads.auto_threads(1) and torch.get_num_threads() == auto
    assert "threads: 3 intra-op (set)" in caplog.text


def test_wait_policy_after_torch_is_refused_and_warned(torch_threads, caplog):
    before = os.environ.get("OMP_WAIT_POLICY")
    assert threads.set_wait_policy("active") is False  # torch is imported in this process
    assert os.environ.get("OMP_WAIT_POLICY") == before
    with caplog.at_level(logging.WARNING, logger="vqdiff.server"):
        threads.apply(Settings(omp_wait_policy="active"))
    assert "omp_wait_policy=active cannot take effect" in caplog.text
    with pytest.raises(ValueError, match="omp_wait_policy: 'spin' is not allowed"):
        threads.set_wait_policy("spin")


@pytest.mark.parametrize("argv, spincount", [([], "0"), (["--omp-wait-policy", "active"], "30000000000")])
def test_vqdiff_serve_sets_the_wait_policy_before_torch_loads(argv, spincount):
    """libgomp prints what it read (OMP_DISPLAY_ENV) when torch loads it; GOMP_SPINCOUNT tells the
    policies apart (unset: 300000). The server itself is stubbed: only the order of start-up counts."""
    code = ("import sys, types; stub = types.ModuleType('vqdiff.server.main'); "
            "stub.serve = lambda settings: __import__('torch'); sys.modules['vqdiff.server.main'] = stub; "
            f"from vqdiff.cli import main; sys.exit(main(['serve', *{argv!r}]))")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("VQDIFF_", "OMP_", "GOMP_"))}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**env, "OMP_DISPLAY_ENV": "VERBOSE"})
    assert r.returncode == 0, r.stderr
    assert f"GOMP_SPINCOUNT = '{spincount}'" in r.stderr
