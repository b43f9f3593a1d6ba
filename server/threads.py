"""The server's CPU thread policy: torch's intra-op threads and OpenMP's wait policy.

A transformer forward on the CPU is a long run of short OpenMP parallel regions. Between two
regions libgomp's worker threads spin (``OMP_WAIT_POLICY=active``, and for a while even when unset)
rather than sleep, which is cheap on an idle machine and ruinous on a busy one: the spinning
workers take the cores the decode threads, the HTTP and gRPC loops and other processes need, and
the region's last thread waits for a core. ``passive`` makes them sleep at once. Measurements and
the choice of defaults: docs/BENCHMARKS.md, "Server: CPU threads and the OpenMP wait policy".

libgomp reads ``OMP_WAIT_POLICY`` once, when torch loads it, so ``set_wait_policy`` must run before
anything imports torch (``vqdiff serve`` calls it first); ``apply`` sets the thread count and logs
what is in effect.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

log = logging.getLogger("vqdiff.server")

_policy_set: str | None = None  # what set_wait_policy put in the environment before torch loaded


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (what
    ``docker run --cpus`` sets; the affinity mask still lists every host CPU there)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit to read
    return n


def auto_threads(decode_workers: int, cpus: int | None = None) -> int:
    """``intra_op_threads = 0``: the available CPUs minus one per decode worker, at least 1. The
    decode workers run their own torch ops (the VQVAE) beside the step loop's forward; counting them
    keeps the forward's threads from queueing behind them for a core."""
    cpus = available_cpus() if cpus is None else cpus
    return max(1, cpus - decode_workers)


def set_wait_policy(policy: str) -> bool:
    """Put ``OMP_WAIT_POLICY`` (``passive`` | ``active``) in the environment for libgomp. False when
    torch is already imported: then it is too late, and ``apply`` warns."""
    global _policy_set
    if policy not in ("passive", "active"):
        raise ValueError(f"omp_wait_policy: {policy!r} is not allowed; expected passive | active")
    if "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = policy.upper()
    _policy_set = policy
    return True


def apply(settings) -> int:
    """Set torch's intra-op thread count from ``settings`` and log the policy; returns the count.
    Call it before the engine starts: a thread that has run a torch op keeps the count it saw."""
    import torch

    cpus = available_cpus()
    n = settings.intra_op_threads or auto_threads(settings.decode_workers, cpus)
    torch.set_num_threads(n)
    how = "set" if settings.intra_op_threads else f"auto: {cpus} CPUs - {settings.decode_workers} decode workers"
    log.info("threads: %d intra-op (%s), OMP_WAIT_POLICY=%s", n, how, os.environ.get("OMP_WAIT_POLICY", "unset"))
    if _policy_set != settings.omp_wait_policy:
        log.warning("omp_wait_policy=%s cannot take effect: torch was imported before set_wait_policy ran "
                    "(OMP_WAIT_POLICY=%s)", settings.omp_wait_policy, os.environ.get("OMP_WAIT_POLICY", "unset"))
    return n
