"""The scale-out roles against the single process, in one run: throughput and latency of the same
requests served by `vqdiff serve`, and by an API node in front of 1 and of 2 workers over a local
redis-server (each worker with --intra-op-threads 1). Needs redis-server on the PATH.

    .venv/bin/python benchmarks/bench_scaleout.py --clients 8 --requests 32 --sequential 8 --steps 16

"one at a time" (sequential) shows the latency the Redis hop adds at low load; "N concurrent clients"
the throughput. Requests stream (SSE), as in benchmarks/bench_server.py, whose load generator this
reuses.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import ROOT, free_port, run  # noqa: E402

from vqdiff.model.shapes.scenes import prompt_set  # noqa: E402


def start(*flags: str) -> subprocess.Popen:
    log = tempfile.TemporaryFile()  # not a pipe: a full pipe would stall the process's logging
    return subprocess.Popen([sys.executable, "-m", "vqdiff.cli", "serve", *flags], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=log, env=os.environ.copy())


def wait(url: str, procs: list[subprocess.Popen]) -> None:
    for _ in range(1200):
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if any(p.poll() is not None for p in procs):
            raise SystemExit(f"a process exited before {url} was ready")
        time.sleep(0.1)
    raise SystemExit(f"{url} never became ready")


def measure(url: str, bodies: list[dict], sequential: int, clients: int) -> tuple[dict, dict]:
    asyncio.run(run(url, bodies[:2], 1))  # warm-up
    return asyncio.run(run(url, bodies[:sequential], 1)), asyncio.run(run(url, bodies, clients))


def setup(workers: int, args, redis_url: str) -> tuple[str, list[subprocess.Popen]]:
    model = ["--model", str(args.model)] if args.model else []
    common = ["--max-rows", str(args.max_rows), "--dtype", "fp32"]
    port = free_port()
    if workers == 0:
        procs = [start("--http-port", str(port), "--grpc-port", "0", "--host", "127.0.0.1", *common, *model)]
        return f"http://127.0.0.1:{port}", procs
    procs = []
    for i in range(workers):
        wport = free_port()
        procs.append(start("--role", "worker", "--redis-url", redis_url, "--worker-name", f"bench{i}",
                           "--worker-port", str(wport), "--intra-op-threads", "1", *common, *model))
        wait(f"http://127.0.0.1:{wport}/readyz", procs)
    procs.append(start("--role", "api", "--redis-url", redis_url, "--http-port", str(port), "--grpc-port", "0",
                       "--host", "127.0.0.1"))
    return f"http://127.0.0.1:{port}", procs


def start_redis() -> tuple[subprocess.Popen, int, str]:
    """A redis-server on a free loopback port, in memory only (no RDB, no AOF): (process, port, URL)."""
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    return proc, port, f"redis://127.0.0.1:{port}/0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model folder (default: the embedded model)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32, help="requests in the concurrent phase")
    ap.add_argument("--sequential", type=int, default=8, help="requests in the one-at-a-time phase")
    ap.add_argument("--max-rows", type=int, default=64)
    ap.add_argument("--steps", type=int, help="override the model's default steps")
    ap.add_argument("--workers", default="0,1,2", help="setups to run: 0 = the single process")
    args = ap.parse_args()
    redis_proc, rport, redis_url = start_redis()
    prompts = [p for p, _ in prompt_set("two", n=args.requests)]
    extra = {"steps": args.steps} if args.steps else {}
    bodies = [{"prompt": p, "seed": i, **extra} for i, p in enumerate(prompts)]
    rows = []
    try:
        time.sleep(0.3)
        for n in (int(w) for w in args.workers.split(",")):
            subprocess.run(["redis-cli", "-p", str(rport), "flushall"], check=True, capture_output=True)
            url, procs = setup(n, args, redis_url)
            try:
                wait(f"{url}/readyz", procs)
                seq, conc = measure(url, bodies, args.sequential, args.clients)
            finally:
                for p in procs:
                    p.send_signal(signal.SIGTERM)
                for p in procs:
                    p.wait(60)
            rows.append(("single process" if n == 0 else f"API + {n} worker{'s' * (n > 1)}", seq, conc))
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)

    print(f"steps {args.steps or 'model default'}, max_rows {args.max_rows}, fp32, {os.cpu_count()} CPUs")
    print(f"| setup | one at a time: p50 / p95 latency s | {args.clients} clients: images/s | p50 / p95 latency s |")
    print("| --- | ---: | ---: | ---: |")
    for name, seq, conc in rows:
        print(f"| {name} | {seq['p50_s']:.3f} / {seq['p95_s']:.3f} | {conc['images_per_s']:.2f} | "
              f"{conc['p50_s']:.2f} / {conc['p95_s']:.2f} |")


if __name__ == "__main__":
    main()
