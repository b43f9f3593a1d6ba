"""Load generator: N concurrent HTTP clients against one-at-a-time serving, in the same run.

Starts ``vqdiff serve`` (the embedded default model unless --model) as a subprocess, then sends the
same prompts twice: one request at a time, and from N closed-loop clients. Every request streams
(SSE, the server's default preview interval), so time to first preview is measured at the client.
Prints images/s, p50/p95 latency and time to first preview for both, and the throughput ratio.
Flags after ``--`` go to ``vqdiff serve``; ``--load N`` runs N busy-loop processes beside the server
for the whole run, so that "a busy machine" is reproducible.

    .venv/bin/python benchmarks/bench_server.py --clients 16 --requests 64
    .venv/bin/python benchmarks/bench_server.py --load 1 -- --intra-op-threads 2 --omp-wait-policy active
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vqdiff.model.shapes.scenes import prompt_set  # noqa: E402


def busy_loops(n: int) -> list[subprocess.Popen]:
    """n processes that each keep one core busy in pure Python (no OpenMP of their own)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float]:
    """(latency s, time to first preview s) of one streamed request."""
    t0 = time.perf_counter()
    first = None
    async with client.stream("POST", f"{url}/v1/generate", json={**body, "stream": True}) as r:
        r.raise_for_status()
        kind = None
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                if kind == "progress" and first is None:
                    first = time.perf_counter() - t0
                elif kind == "error":
                    raise RuntimeError(line)
                elif kind == "result":
                    json.loads(line[6:])
    latency = time.perf_counter() - t0
    return latency, first if first is not None else latency


async def run(url: str, bodies: list[dict], clients: int) -> dict:
    queue = list(bodies)
    results: list[tuple[float, float]] = []

    async def worker(client):
        while queue:
            results.append(await one(client, url, queue.pop(0)))

    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    ttfp = sorted(r[1] for r in results)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"clients": clients, "requests": len(results), "wall_s": wall, "images_per_s": len(results) / wall,
            "p50_s": statistics.median(lat), "p95_s": pct(lat, 0.95), "ttfp_p50_s": statistics.median(ttfp),
            "ttfp_p95_s": pct(ttfp, 0.95)}


def scrape(exposition: str, name: str) -> float:
    """The largest sample of ``name`` in a Prometheus text exposition (0 when absent)."""
    values = [float(line.rsplit(" ", 1)[1]) for line in exposition.splitlines()
              if line.startswith(name + "{") or line.startswith(name + " ")]
    return max(values, default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model folder (default: the embedded model)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64, help="requests in the concurrent phase")
    ap.add_argument("--sequential", type=int, default=16, help="requests in the one-at-a-time phase")
    ap.add_argument("--max-rows", type=int, default=64)
    ap.add_argument("--steps", type=int, help="override the model's default steps")
    ap.add_argument("--sampler", help="override the model's default sampler (posterior: its T forwards)")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak (e.g. 989 for an H100/H200 in bf16 "
                    "dense): prints the forward's model-FLOPs utilisation (benchmarks/flops.py)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--dtype", default="fp32", help="the server's --dtype (fp32 | bf16 | auto)")
    ap.add_argument("--load", type=int, default=0, help="busy-loop processes beside the server (default 0)")
    ap.add_argument("serve", nargs="*", help="flags for vqdiff serve, after --")
    args = ap.parse_args()

    port = free_port()
    cmd = [sys.executable, "-m", "vqdiff.cli", "serve", "--http-port", str(port), "--grpc-port", "0",
           "--max-rows", str(args.max_rows), "--host", "127.0.0.1", "--dtype", args.dtype, *args.serve]
    if args.model:
        cmd += ["--model", str(args.model)]
    load = busy_loops(args.load)
    log = tempfile.TemporaryFile()  # not a pipe: a full pipe would stall the server's logging
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                log.seek(0)
                raise SystemExit(f"the server exited: {log.read().decode()[-2000:]}")
            time.sleep(0.1)
        info = httpx.get(f"{url}/v1/models").json()["data"][0]
        prompts = [p for p, _ in prompt_set("two", n=args.requests)]
        extra = {k: v for k, v in (("steps", args.steps), ("sampler", args.sampler)) if v}
        bodies = [{"prompt": p, "seed": i, **extra} for i, p in enumerate(prompts)]
        asyncio.run(run(url, bodies[:2], 1))  # warm-up
        seq = asyncio.run(run(url, bodies[: args.sequential], 1))
        conc = asyncio.run(run(url, bodies, args.clients))
        peak = scrape(httpx.get(f"{url}/metrics").text, "vqdiff_device_memory_peak_bytes")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        for p in load:
            p.kill()
            p.wait()
    log.seek(0)
    threads = next((line for line in log.read().decode().splitlines() if "threads:" in line), "")

    params = info["default_params"]
    # forwards per image: what was asked, else the sampler's (posterior: the model's T), else the default
    forwards = args.steps or (info["num_timesteps"] if args.sampler == "posterior" else params["steps"])
    print(f"model {info['id']} ({info['parameters']:,} parameters, {info['image_size']}px), "
          f"steps {forwards}, sampler {args.sampler or params['sampler']}, max_rows {args.max_rows}, "
          f"{info['dtype']} on {info['device']}")
    print(f"server flags: {' '.join(args.serve) or '(defaults)'}; {args.load} busy-loop processes beside it; "
          f"{threads.split('threads: ')[-1] if threads else 'no thread log line'}")
    print("| mode | requests | images/s | p50 latency s | p95 latency s | p50 first preview s | p95 first preview s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in (("one at a time", seq), (f"{args.clients} concurrent clients", conc)):
        print(f"| {name} | {r['requests']} | {r['images_per_s']:.2f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
              f"{r['ttfp_p50_s']:.2f} | {r['ttfp_p95_s']:.2f} |")
    print(f"throughput ratio (concurrent / one at a time): {conc['images_per_s'] / seq['images_per_s']:.2f}x")
    print(f"peak device memory (vqdiff_device_memory_peak_bytes): {peak / 1e9:.2f} GB with {args.clients} "
          f"concurrent clients of 1 image each")
    if args.peak_tflops:
        from flops import image_flops
        from vqdiff.model.io.default import default_model_dir
        from vqdiff.model.io.folder import read_config

        config = read_config(args.model or default_model_dir())
        per_image = image_flops(config.transformer, config.text_encoder.max_length, forwards)
        for name, r in (("one at a time", seq), (f"{args.clients} concurrent clients", conc)):
            achieved = r["images_per_s"] * per_image / 1e12
            print(f"MFU {name}: {achieved:.3g} TFLOP/s of {args.peak_tflops:g} = {achieved / args.peak_tflops:.1%} "
                  f"({per_image / 1e12:.3g} TFLOP per image; the limit {args.peak_tflops * 1e12 / per_image:.3g} images/s)")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "args": {k: str(v) for k, v in vars(args).items()},
                                         "one_at_a_time": seq, "concurrent": conc, "peak_memory_bytes": peak},
                                        indent=1))


if __name__ == "__main__":
    main()
