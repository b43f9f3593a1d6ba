"""The sampling-step kernels against the torch reference and torch.compile of it, at ITHQ shapes.

    python benchmarks/bench_kernels.py [--batch 1 8 32] [--dtype fp32 bf16] [--out bench.json]
    python benchmarks/bench_kernels.py --smoke     # no GPU: tiny shapes, kernels under the Triton interpreter

N = 1024 positions, K = 4096 classes (ITHQ). For every batch size B and logit dtype, three rows:

    guided    ``guided_purity``, purity only: the selection samplers' hot path. Bytes: 2 B N K (logits read)
              + 4 B N (purity written).
    guided+lp ``guided_purity`` with the truncated log p written (r = 0.86 in every row): previews and the
              posterior samplers. Bytes: the above + 4 B N K.
    step      ``denoise_step`` for purity-sampler rows, Δz = 10 tokens per row, r = 1 (the default):
              guided, selection, draw. Bytes: guided's + the 2 B Δz K logits the draw reads again.

Each is timed as the kernels (``VQDIFF_KERNELS=triton``), the torch reference (``=torch``) and
``torch.compile`` of the reference (``--compile largest``: at the largest B only, since each shape
compiles anew; ``all`` or ``none``). Times are medians of ``triton.testing.do_bench`` (L2 flushed
between runs). GB/s counts the bytes above over the kernel time; the fraction is of the device's peak
memory bandwidth (H100 SXM 3.35 TB/s, H100 PCIe 2.0, H100 NVL 3.9, H200 4.8; ``--peak-tbs`` overrides).
"of copy" is the kernel's GB/s over that of a plain device copy moving guided's bytes (read +
written), timed in the same run: what the card reaches at that size (a copy of 134 MB does not reach
the datasheet's peak). Targets (docs/BENCHMARKS.md): at least 70% of peak and at least 3x the reference. Outputs are compared with the
reference's at every shape (purity max relative difference, chosen and drawn tokens that differ).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE and os.environ.get("TRITON_INTERPRET") is None:
    import torch as _torch  # does not import triton

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vqdiff.model.config import DiffusionConfig  # noqa: E402
from vqdiff.model.diffusion import Schedule  # noqa: E402
from vqdiff.model.sampling.step import PURITY, BatchParams, denoise_step  # noqa: E402
import vqdiff.model.sampling.step as ref  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGET_FRACTION, TARGET_SPEEDUP = 0.70, 3.0


def peak_bandwidth(name: str) -> float | None:
    """Bytes per second of the device's memory, from its name (None if unknown)."""
    n = name.upper()
    if "H200" in n:
        return 4.8e12
    if "H100" in n:
        return 2.0e12 if "PCIE" in n else 3.9e12 if "NVL" in n else 3.35e12
    if "A100" in n:
        return 2.0e12 if "80GB" in n else 1.555e12
    return None


def timer(fn, device: str, reps: int) -> float:
    """Median milliseconds of fn()."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=reps, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def logits(b: int, n: int, k: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(b)
    cond = (torch.randn(b, n, k, device=device, generator=g) * 3).to(dtype)  # (B, N, K)
    return cond, (torch.randn(b, n, k, device=device, generator=g) * 3).to(dtype)


def params(b: int, count: int, truncation_rate: float, device: str) -> BatchParams:
    """B purity-sampler rows, guidance 5 (ITHQ's), each at its own seed and step."""
    rows = [dict(guidance_scale=5.0, truncation_rate=truncation_rate, purity_weight=1.0, kind=PURITY, seed=1000 + i,
                 step=i, count=count, t_eval=0) for i in range(b)]
    return BatchParams.build(rows, device)


def with_backend(backend: str, fn):
    def run():
        os.environ["VQDIFF_KERNELS"] = backend
        return fn()

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    ap.add_argument("--tokens-per-step", type=int, default=10, help="Δz per row in the step row")
    ap.add_argument("--compile", choices=["largest", "all", "none"], default=None,
                    help="where to time torch.compile of the reference (default: largest; none with --smoke)")
    ap.add_argument("--reps", type=int, default=100, help="do_bench's rep (milliseconds of timed runs)")
    ap.add_argument("--peak-tbs", type=float, default=None, help="the device's memory bandwidth, TB/s")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes under the Triton interpreter")
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="wall-clock budget: torch.compile is skipped past 60%% of it, further shapes past all of it")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    start = time.monotonic()

    if torch.cuda.is_available():
        device, name = "cuda", torch.cuda.get_device_name(0)
        n, k = 1024, 4096
    elif args.smoke:
        device, name = "cpu", f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"
        n, k, args.batch = 64, 512, [2]
        args.compile = args.compile or "none"
    else:
        print("bench_kernels: no CUDA device; nothing to benchmark (--smoke runs tiny shapes on the CPU "
              "under the Triton interpreter)")
        return 0
    args.compile = args.compile or "largest"
    if device == "cpu":
        print("smoke run: times are the interpreter's, not the kernels'")
    peak = args.peak_tbs * 1e12 if args.peak_tbs else peak_bandwidth(name) if device == "cuda" else None
    import triton  # noqa: F401  (after TRITON_INTERPRET is decided)

    sched = Schedule(DiffusionConfig(num_classes=k))
    print(f"device: {name}; peak memory bandwidth: {peak / 1e12:.2f} TB/s" if peak else f"device: {name}")
    print(f"torch {torch.__version__}, triton {triton.__version__}; N = {n}, K = {k}")
    header = (f"{'op':<10}{'dtype':<6}{'B':>4}{'kernel ms':>11}{'torch ms':>10}{'compile ms':>11}{'GB/s':>8}"
              f"{'of peak':>9}{'of copy':>9}{'x torch':>9}{'x comp.':>9}  check")
    print(header)
    print("-" * len(header))
    results = []
    for dname in args.dtype:
        dtype, s = DTYPES[dname], DTYPES[dname].itemsize
        for b in sorted(args.batch, reverse=True):  # the largest first: the numbers that matter most
            if time.monotonic() - start > args.budget_s:
                print(f"stopped at {dname} B={b}: past the {args.budget_s:.0f} s budget")
                break
            compiled = args.compile == "all" or (args.compile == "largest" and b == max(args.batch))
            count = min(args.tokens_per_step, n)
            cond, uncond = logits(b, n, k, dtype, device)
            x = torch.full((b, n), k, device=device)  # (B, N): all masked, the first step
            p = params(b, count, 1.0, device)
            g, r = p.guidance_scale, params(b, count, 0.86, device).truncation_rate

            def guided(ops, c=cond, u=uncond, g=g, r=r):
                return lambda: ops.guided_purity(c, u, g, r, False, False)

            def guided_lp(ops, c=cond, u=uncond, g=g, r=r):
                return lambda: ops.guided_purity(c, u, g, r, True, True)

            step_fn = lambda c=cond, u=uncond, x=x, p=p: denoise_step(c, u, x, p, sched)  # noqa: E731
            base = 2 * b * n * k * s + 4 * b * n
            rows = [
                ("guided", guided, base),
                ("guided+lp", guided_lp, base + 4 * b * n * k),
                ("step", None, base + 2 * b * count * k * s),
            ]
            from vqdiff.kernels import ops as kops

            src = torch.empty(base // 8, dtype=torch.float32, device=device).normal_()  # a copy moving guided's
            dst = torch.empty_like(src)  # bytes (read + written): what this card reaches at this size
            copy_gbs = base / (timer(lambda d=dst, s_=src: d.copy_(s_), device, args.reps) * 1e-3) / 1e9
            del src, dst

            for op, make, nbytes in rows:
                if make is None:
                    fk, fr = with_backend("triton", step_fn), with_backend("torch", step_fn)
                else:
                    fk, fr = make(kops), make(ref)
                got, want = fk(), fr()
                check = compare(op, got, want)
                t_k, t_r = timer(fk, device, args.reps), timer(fr, device, args.reps)
                t_c = None
                if compiled and time.monotonic() - start > 0.6 * args.budget_s:
                    check += "; compile skipped (time budget)"
                elif compiled:
                    try:
                        if make is None:  # the backend is chosen outside the compiled function
                            fc = with_backend("torch", torch.compile(step_fn, dynamic=False))
                        else:
                            fc = torch.compile(make(ref), dynamic=False)
                        fc()
                        t_c = timer(fc, device, args.reps)
                    except Exception as e:  # reported in the table and the JSON, not fatal to the run
                        check += f"; compile failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
                gbs = nbytes / (t_k * 1e-3) / 1e9
                frac = gbs * 1e9 / peak if peak else None
                row = dict(op=op, dtype=dname, batch=b, n=n, k=k, bytes=nbytes, kernel_ms=t_k, torch_ms=t_r,
                           compile_ms=t_c, gb_per_s=gbs, fraction_of_peak=frac, copy_gb_per_s=copy_gbs,
                           fraction_of_copy=gbs / copy_gbs, speedup_torch=t_r / t_k,
                           speedup_compile=(t_c / t_k) if t_c else None, check=check,
                           meets_targets=(frac is not None and frac >= TARGET_FRACTION and t_r / t_k >= TARGET_SPEEDUP))
                results.append(row)
                fmt = lambda v, w, f: "-".rjust(w) if v is None else format(v, f">{w}{f}")  # noqa: E731
                print(f"{op:<10}{dname:<6}{b:>4}{t_k:>11.3f}{t_r:>10.3f}{fmt(t_c, 11, '.3f')}{gbs:>8.0f}"
                      f"{fmt(frac and 100 * frac, 8, '.1f')}%{100 * gbs / copy_gbs:>8.1f}%{t_r / t_k:>9.1f}{fmt(row['speedup_compile'], 9, '.1f')}"
                      f"  {check}")
            del cond, uncond
            if device == "cuda":
                torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=name, peak_bytes_per_s=peak, torch=torch.__version__, results=results), f, indent=1)
        print(f"wrote {args.out}")
    if device == "cuda" and peak:
        hot = [r for r in results if r["op"] == "guided"]
        ok = all(r["meets_targets"] for r in hot if r["batch"] >= 8)
        print(f"targets (>= {TARGET_FRACTION:.0%} of peak and >= {TARGET_SPEEDUP:.0f}x torch) on the hot path, "
              f"B >= 8: {'met' if ok else 'NOT met'}")
    return 0


def compare(op: str, got, want) -> str:
    """A short note of how the kernel's outputs differ from the reference's."""
    if op == "step":
        diff = int((got.tokens != want.tokens).sum())
        rel = ((got.purity - want.purity).abs() / want.purity).max().item()
        return f"tokens differ: {diff}; purity rel {rel:.1e}"
    (gp, glp), (wp, wlp) = got, want
    note = f"purity rel {((gp - wp).abs() / wp).max().item():.1e}"
    if glp is not None:
        kept = int(((glp == ref.LOG_MIN) != (wlp == ref.LOG_MIN)).sum())
        note += f"; kept-set differences {kept}"
    return note


if __name__ == "__main__":
    sys.exit(main())
