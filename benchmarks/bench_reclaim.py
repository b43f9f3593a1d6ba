"""How long a killed worker's jobs wait, and what one job costs Redis. Needs redis-server on the PATH.

Reclaim (for each ``--leases``): a survivor worker and a victim worker of the same lease over a local
redis-server; ``--jobs`` jobs are enqueued straight into the job stream (server/broker.py) and, once
the victim holds some of them and runs them, the victim is killed with SIGKILL. Measured from the
kill: when the survivor has claimed each of the victim's jobs (its XCLAIM: the entry's consumer is
no longer the victim) and when each one's answer is stored (its ``done:`` flag), and the victim's
lease time left at the kill (PTTL of ``alive:{victim}``). ``--trials`` kills per lease, a fresh
victim each time. The bound: the lease must lapse (at most ``lease``, at least about 2/3 of it: it
is renewed every lease / 3) and the entries must have been idle a lease (``min_idle_ms``), then the
survivor's next reclaim pass comes within lease / 2: claimed within about 1.5 x lease of the kill.

Budget (``--budget``): an API node in front of one worker; Redis's INFO commandstats over
``--budget-jobs`` plain requests, less what the two processes send idle over the same time, per job;
and the size of a streamed job's events in Redis (a progress event carries a base64 PNG of each of
its images).

    .venv/bin/python benchmarks/bench_reclaim.py --leases 1,5 --trials 5
    .venv/bin/python benchmarks/bench_reclaim.py --leases "" --budget
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scaleout import start, start_redis, wait  # noqa: E402
from bench_server import free_port  # noqa: E402

from vqdiff.model.sampling.params import GenerationParams  # noqa: E402
from vqdiff.model.shapes.scenes import prompt_set  # noqa: E402
from vqdiff.server.broker import GROUP, Broker, key  # noqa: E402
from vqdiff.server.jobs import Job  # noqa: E402


def worker(name: str, redis_url: str, lease_s: float, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    model = ["--model", str(args.model)] if args.model else []
    proc = start("--role", "worker", "--redis-url", redis_url, "--worker-name", name, "--worker-port", str(port),
                 "--lease-s", str(lease_s), "--max-rows", str(args.max_rows), "--intra-op-threads", "1",
                 "--dtype", "fp32", *model)
    return proc, f"http://127.0.0.1:{port}/readyz"


def jobs(broker: Broker, n: int, steps: int | None, tag: str) -> list[Job]:
    """``n`` one-image jobs, their parameters resolved as an API node does."""
    (name, info), = broker.models().items()
    base = GenerationParams.from_dict(info["generation_defaults"], GenerationParams(steps=min(100, info["num_tokens"])))
    out = []
    for i, (prompt, _) in enumerate(prompt_set("two", n=n)):
        p = GenerationParams.from_dict({"seed": i, **({"steps": steps} if steps else {})}, base)
        p = p.resolve(num_tokens=info["num_tokens"], num_timesteps=info["num_timesteps"], has_null=info["has_null"])
        out.append(Job(id=f"bench-{tag}-{i}", model=name, prompt=prompt, params=p, deadline=time.time() + 600))
    return out


def trial(broker: Broker, victim: str, proc: subprocess.Popen, todo: list[Job]) -> dict:
    r, model = broker.r, todo[0].model
    stream = key("jobs", model)
    for j in todo:
        broker.enqueue(j)
    end = time.monotonic() + 60
    while not r.xpending_range(stream, GROUP, "-", "+", 100, consumername=victim):
        if time.monotonic() > end:
            raise SystemExit(f"{victim} never held a job")
        time.sleep(0.005)
    time.sleep(0.3)  # its jobs run
    ttl_ms = r.pttl(key("alive", victim))
    proc.send_signal(signal.SIGKILL)
    t0 = time.perf_counter()
    proc.wait(10)
    # what it held when it died (its lease is still on: nobody can have claimed any yet)
    ids = [e["message_id"] for e in r.xpending_range(stream, GROUP, "-", "+", 100, consumername=victim)]
    if not ids:
        raise SystemExit(f"{victim} finished its jobs before the kill: give them more --steps")
    entries = {eid: json.loads(f[b"job"])["id"] for eid, f in r.xrange(stream) if eid in ids}
    claimed: dict[bytes, float] = {}
    stored: dict[bytes, float] = {}
    while len(stored) < len(ids):
        if time.perf_counter() - t0 > 300:
            raise SystemExit(f"the victim's jobs were not all answered: {len(stored)} of {len(ids)}")
        p = r.pipeline(transaction=False)
        for eid in ids:
            p.xpending_range(stream, GROUP, eid, eid, 1)
            p.exists(key("done", entries[eid]))
        got = p.execute()
        now = time.perf_counter() - t0
        for eid, pending, done in zip(ids, got[::2], got[1::2]):
            if eid not in claimed and (not pending or pending[0]["consumer"].decode() != victim):
                claimed[eid] = now
            if done and eid not in stored:
                stored[eid] = now
        time.sleep(0.002)
    end = time.monotonic() + 300
    while broker.depth(model) != (0, 0):  # the survivor finishes the rest before the next trial
        if time.monotonic() > end:
            raise SystemExit(f"jobs left: {broker.depth(model)}")
        time.sleep(0.05)
    return {"held": len(ids), "ttl_s": ttl_ms / 1000, "claim_first_s": min(claimed.values()),
            "claim_last_s": max(claimed.values()), "stored_last_s": max(stored.values())}


def reclaim(args, redis_url: str) -> list[tuple[float, list[dict]]]:
    broker = Broker(redis_url)
    rows = []
    for lease in (float(x) for x in args.leases.split(",") if x):
        broker.r.flushall()
        survivor, ready = worker("survivor", redis_url, lease, args)
        procs = [survivor]
        try:
            wait(ready, procs)
            results = []
            for t in range(args.trials):
                victim, vready = worker(f"victim{t}", redis_url, lease, args)
                wait(vready, [survivor, victim])
                results.append(trial(broker, f"victim{t}", victim, jobs(broker, args.jobs, args.steps, f"{lease}-{t}")))
                print(f"lease {lease:g} s, trial {t}: {results[-1]}", flush=True)
            rows.append((lease, results))
        finally:
            survivor.send_signal(signal.SIGTERM)
            survivor.wait(60)
    return rows


def budget(args, redis_url: str) -> None:
    broker = Broker(redis_url)
    broker.r.flushall()
    w, ready = worker("budget", redis_url, 5.0, args)
    port = free_port()
    api = start("--role", "api", "--redis-url", redis_url, "--http-port", str(port), "--grpc-port", "0",
                "--host", "127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    try:
        wait(ready, [w, api])
        wait(f"{base}/readyz", [w, api])
        bodies = [{"prompt": p, "seed": i, "steps": args.budget_steps} for i, (p, _) in enumerate(prompt_set("two", n=args.budget_jobs))]
        for b in bodies[:2]:  # warm-up
            httpx.post(f"{base}/v1/generate", json=b, timeout=120).raise_for_status()

        def stats() -> dict[str, int]:
            return {k.removeprefix("cmdstat_"): v["calls"] for k, v in broker.r.info("commandstats").items()}

        idle_s = 10.0
        broker.r.config_resetstat()
        time.sleep(idle_s)
        idle = stats()
        broker.r.config_resetstat()
        queue, lock = list(bodies), threading.Lock()

        def client() -> None:
            with httpx.Client(timeout=300) as http:
                while True:
                    with lock:
                        if not queue:
                            return
                        b = queue.pop()
                    http.post(f"{base}/v1/generate", json=b).raise_for_status()

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        busy_s = time.perf_counter() - t0
        busy = stats()
        n = len(bodies)
        print(f"\n{n} plain requests (steps {args.budget_steps}, {args.clients} clients) in {busy_s:.1f} s; "
              f"idle rate over {idle_s:g} s subtracted")
        print("| command | calls | idle calls/s (API + worker) | per job, less idle |")
        print("| --- | ---: | ---: | ---: |")
        total = 0.0
        for cmd in sorted(set(busy) | set(idle), key=lambda c: -busy.get(c, 0)):
            if cmd in ("info", "config|resetstat", "config"):
                continue  # this script's own
            rate = idle.get(cmd, 0) / idle_s
            per_job = (busy.get(cmd, 0) - rate * busy_s) / n
            total += per_job
            print(f"| {cmd} | {busy.get(cmd, 0)} | {rate:.2f} | {per_job:.2f} |")
        print(f"| all | {sum(busy.values())} | {sum(idle.values()) / idle_s:.2f} | {total:.2f} |")

        # a streamed job's events: previews every steps/8 (the server's default), n images
        n_images = args.budget_images
        job_id = None
        with httpx.stream("POST", f"{base}/v1/generate", timeout=120,
                          json={"prompt": bodies[0]["prompt"], "seed": 1, "n": n_images, "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: ") and job_id is None:
                    job_id = json.loads(line[6:])["id"]
        entries = broker.r.xrange(key("events", job_id))
        sizes = {"progress": [], "result": []}
        per_image = []
        for _, f in entries:
            kind = f[b"kind"].decode()
            sizes.setdefault(kind, []).append(sum(len(k) + len(v) for k, v in f.items()))
            if kind == "progress":
                per_image += [len(p) for p in json.loads(f[b"data"])["previews"]]
        print(f"\nstreamed job of {n_images} images, default model: {len(sizes['progress'])} progress events of "
              f"{statistics.mean(sizes['progress']):.0f} bytes on average ({statistics.mean(per_image):.0f} bytes of "
              f"base64 PNG an image), result {statistics.mean(sizes['result']):.0f} bytes")
    finally:
        for p in (api, w):
            p.send_signal(signal.SIGTERM)
        for p in (api, w):
            p.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model folder (default: the embedded model)")
    ap.add_argument("--leases", default="1,5", help="lease seconds to measure, comma-separated ('' for none)")
    ap.add_argument("--trials", type=int, default=5, help="kills per lease")
    ap.add_argument("--jobs", type=int, default=8, help="jobs enqueued per trial (one image each)")
    ap.add_argument("--steps", type=int, help="override the model's default steps (reclaim trials)")
    ap.add_argument("--max-rows", type=int, default=16)
    ap.add_argument("--budget", action="store_true", help="also count Redis commands per job and event sizes")
    ap.add_argument("--budget-jobs", type=int, default=64)
    ap.add_argument("--budget-steps", type=int, default=8)
    ap.add_argument("--budget-images", type=int, default=4, help="images of the streamed job")
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    redis_proc, _, redis_url = start_redis()
    try:
        time.sleep(0.3)
        rows = reclaim(args, redis_url)
        if args.budget:
            budget(args, redis_url)
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)

    if rows:
        print(f"\n{args.jobs} jobs a trial, steps {args.steps or 'model default'}, max_rows {args.max_rows}, fp32, "
              f"{os.cpu_count()} CPUs; seconds from the SIGKILL, median [min, max] over {args.trials} trials")
        print("| lease s | jobs held | lease left at the kill | all claimed | all answers stored | bound 1.5 x lease |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for lease, res in rows:
            held = statistics.median(x["held"] for x in res)
            print(f"| {lease:g} | {held:g} | {spread(res, 'ttl_s')} | {spread(res, 'claim_last_s')} | "
                  f"{spread(res, 'stored_last_s')} | {1.5 * lease:g} |")


def spread(results: list[dict], k: str) -> str:
    """median [min, max] of ``k`` over the trials."""
    v = [x[k] for x in results]
    return f"{statistics.median(v):.2f} [{min(v):.2f}, {max(v):.2f}]"


if __name__ == "__main__":
    main()
