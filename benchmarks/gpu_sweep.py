"""What bench_kernels.py's table needs around it on a GPU: the measured ceilings, guided_purity's launch
configurations, the step's parts, and the ITHQ forward the step follows.

    python benchmarks/gpu_sweep.py [--out sweep.json] [--budget-s 150]
    python benchmarks/gpu_sweep.py --smoke      # no GPU: tiny shapes under the Triton interpreter

1. ceiling   a device-to-device copy of 2 GiB (bytes read + written over time): the bandwidth a
             memory-bound kernel can reach on this card, beside the datasheet's.
2. configs   ``_guided_purity_kernel`` (purity only) at B = 8 and 32, N = 1024, K = 4096, fp32 and bf16,
             one position a program, by num_warps: which launch reaches the ceiling.
3. draw      ``_draw_kernel`` alone (B = 1 and 32, 10 positions a row, bf16), by num_warps, with
             truncation (r = 0.86) and without: what one position's draw costs.
4. step      ``denoise_step`` eager and replayed from a CUDA graph, kernels and references: the device
             time of the step without the host's launch overhead.
5. parts     guided_purity, select_masked and draw_at alone, kernels vs references (B = 32, bf16).
6. forward   one ITHQ transformer forward (36 layers, random weights, bf16, text k/v cached) at 2, 16
             and 64 rows (1, 8, 32 images with their uncond rows) beside the step of those images:
             the fraction of a sampling step the step's ops are.

Times are medians of ``triton.testing.do_bench`` (L2 flushed). Each section stops at the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE and os.environ.get("TRITON_INTERPRET") is None:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import vqdiff.model.sampling.step as ref  # noqa: E402
from vqdiff.model.config import DiffusionConfig, ithq  # noqa: E402
from vqdiff.model.diffusion import Schedule  # noqa: E402
from vqdiff.model.sampling.step import PURITY, BatchParams, denoise_step  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bench(fn, reps: int = 50) -> float:
    """Median milliseconds of fn()."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=reps, return_mode="median"))
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def rows_params(b: int, count: int, device: str) -> BatchParams:
    rows = [dict(guidance_scale=5.0, truncation_rate=0.86, purity_weight=1.0, kind=PURITY, seed=7 + i, step=i,
                 count=count, t_eval=0) for i in range(b)]
    return BatchParams.build(rows, device)


def ceiling(device: str, gib: float) -> dict:
    n = int(gib * 2**30) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    out = dict(bytes=2 * src.numel() * 4, ms=ms, tb_per_s=2 * src.numel() * 4 / (ms * 1e-3) / 1e12)
    print(f"ceiling: copy of {gib:g} GiB: {ms:.3f} ms, {out['tb_per_s']:.2f} TB/s (read + written)")
    return out


def configs(device: str, batches: list[int], n: int, k: int, copy_tbs: float | None, deadline: float) -> list[dict]:
    import triton

    from vqdiff.kernels.guided import _guided_purity_kernel

    results = []
    print(f"\nconfigs: guided_purity, purity only, N={n} K={k}, one position a program")
    print(f"{'dtype':<6}{'B':>4}{'warps':>6}{'ms':>9}{'GB/s':>8}{'of copy':>9}  purity rel")
    precise = device == "cuda"  # no libdevice under the interpreter
    for dname, dtype in DTYPES.items():
        for b in batches:
            g = torch.Generator(device=device).manual_seed(1)
            cond = (torch.randn(b, n, k, device=device, generator=g) * 3).to(dtype)
            uncond = (torch.randn(b, n, k, device=device, generator=g) * 3).to(dtype)
            p = rows_params(b, 10, device)
            want, _ = ref.guided_purity(cond, uncond, p.guidance_scale, p.truncation_rate)
            nbytes = 2 * cond.numel() * cond.element_size() + 4 * b * n
            for warps in (4, 8, 16):
                if time.monotonic() > deadline:
                    print("configs: stopped at the budget")
                    return results
                purity = torch.full((b, n), float("nan"), device=device)

                def run():
                    _guided_purity_kernel[(b * n,)](
                        cond, uncond, p.guidance_scale, p.truncation_rate, purity, purity, b * n, n, k,
                        ROWS=1, BLOCK_K=triton.next_power_of_2(k), WRITE_LOG_P=False, TRUNCATE=False,
                        PRECISE=precise, num_warps=warps, enable_fp_fusion=False)

                run()
                rel = ((purity - want).abs() / want).max().item()
                ms = bench(run)
                gbs = nbytes / (ms * 1e-3) / 1e9
                frac = gbs / (copy_tbs * 1e3) if copy_tbs else None
                results.append(dict(dtype=dname, batch=b, warps=warps, ms=ms, gb_per_s=gbs, fraction_of_copy=frac,
                                    purity_rel=rel))
                fr = f"{100 * frac:8.1f}%" if frac else "        -"
                print(f"{dname:<6}{b:>4}{warps:>6}{ms:>9.4f}{gbs:>8.0f}{fr}  {rel:.1e}")
            cond = uncond = None  # free the inputs (a rebinding, not del: run() closes over them)
    return results


def step_case(device: str, b: int, n: int, k: int, count: int, dtype: torch.dtype):
    """Logits, tokens half unmasked (mid-sampling), params, and the chosen positions of one step."""
    g = torch.Generator(device=device).manual_seed(2)
    cond = (torch.randn(b, n, k, device=device, generator=g) * 3).to(dtype)
    uncond = (torch.randn(b, n, k, device=device, generator=g) * 3).to(dtype)
    p = rows_params(b, count, device)
    x = torch.full((b, n), k, device=device)
    x[:, : n // 2] = torch.randint(0, k, (b, n // 2), device=device, generator=g)
    pur, _ = ref.guided_purity(cond, uncond, p.guidance_scale, p.truncation_rate)
    score = pur / pur.max(dim=-1, keepdim=True).values
    chosen = ref.select_masked(score, x == k, p.count, p.seed, p.step)
    return cond, uncond, x, p, score, chosen


def draw(device: str, batches: list[int], n: int, k: int, count: int, deadline: float) -> list[dict]:
    """The draw kernel alone, by warps and with truncation on (r = 0.86) and off (r = 1)."""
    import triton

    from vqdiff.kernels.draw import _draw_kernel
    from vqdiff.model.sampling import rng

    out = []
    print(f"\ndraw: _draw_kernel, bf16, {count} positions a row, N={n} K={k}")
    print(f"{'B':>4}{'warps':>6}{'truncate':>9}{'ms':>9}  tokens differ from the reference")
    for b in batches:
        cond, uncond, x, p, score, chosen = step_case(device, b, n, k, count, torch.bfloat16)
        sharpen = 1.0 + score
        for truncate in (True, False):
            r = p.truncation_rate if truncate else torch.ones_like(p.truncation_rate)
            want = ref.draw_at(cond, uncond, p.guidance_scale, r, sharpen, chosen, x, p.seed, p.step, count, True)
            for warps in (4, 8, 16, 32):
                if time.monotonic() > deadline:
                    print("draw: stopped at the budget")
                    return out
                res = x.clone()

                def run():
                    _draw_kernel[(b, count)](
                        cond, uncond, p.guidance_scale, r, sharpen, chosen.view(torch.uint8), p.seed, p.step, res,
                        n, k, STREAM=rng.TOKEN, BLOCK_N=triton.next_power_of_2(n), BLOCK_K=triton.next_power_of_2(k),
                        TRUNCATE=truncate, PRECISE=device == "cuda", num_warps=warps, enable_fp_fusion=False)

                run()
                diff = int((res != want).sum())
                ms = bench(run)
                out.append(dict(batch=b, warps=warps, truncate=truncate, ms=ms, tokens_differ=diff))
                print(f"{b:>4}{warps:>6}{str(truncate):>9}{ms:>9.4f}  {diff}")
    return out


def graphed(device: str, batches: list[int], n: int, k: int, count: int) -> list[dict]:
    """denoise_step's device time: eager (host launches included) and replayed from a CUDA graph."""
    sched = Schedule(DiffusionConfig(num_classes=k))
    out = []
    print(f"\nstep: denoise_step, purity rows, {count} tokens a row, eager vs CUDA-graph replay (device time)")
    print(f"{'dtype':<6}{'B':>4}{'backend':>8}{'eager ms':>10}{'graph ms':>10}")
    for dname, dtype in DTYPES.items():
        for b in batches:
            cond, uncond, x, p, _, _ = step_case(device, b, n, k, count, dtype)
            for backend in ("triton", "torch"):
                os.environ["VQDIFF_KERNELS"] = backend
                fn = lambda: denoise_step(cond, uncond, x, p, sched)  # noqa: E731
                eager = bench(fn)
                t_g = None
                if device == "cuda":
                    try:
                        side = torch.cuda.Stream()
                        side.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(side):
                            for _ in range(3):
                                fn()
                        torch.cuda.current_stream().wait_stream(side)
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            fn()
                        t_g = bench(graph.replay)
                    except Exception as e:  # a reported result, not fatal
                        print(f"  graph capture failed ({backend}): {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                out.append(dict(dtype=dname, batch=b, backend=backend, eager_ms=eager, graph_ms=t_g))
                gs = "-" if t_g is None else f"{t_g:.4f}"
                print(f"{dname:<6}{b:>4}{backend:>8}{eager:>10.4f}{gs:>10}")
            cond = uncond = None  # free the inputs (a rebinding, not del: run() closes over them)
    os.environ.pop("VQDIFF_KERNELS", None)
    return out


def parts(device: str, b: int, n: int, k: int, count: int) -> list[dict]:
    from vqdiff.kernels import ops

    cond, uncond, x, p, score, chosen = step_case(device, b, n, k, count, torch.bfloat16)
    masked = x == k
    sharpen = 1.0 + score
    guide = (cond, uncond, p.guidance_scale, p.truncation_rate)
    calls = {
        "guided_purity": lambda m: m.guided_purity(*guide, False, True),
        "select_masked": lambda m: m.select_masked(score, masked, p.count, p.seed, p.step),
        "draw_at": lambda m: m.draw_at(*guide, sharpen, chosen, x, p.seed, p.step, p.max_count, True),
    }
    out = []
    print(f"\nparts: B={b} N={n} K={k} bf16, r = 0.86, {count} tokens a row, half the positions masked")
    print(f"{'op':<15}{'kernel ms':>10}{'torch ms':>10}{'x torch':>9}")
    for name, call in calls.items():
        t_k, t_r = bench(lambda: call(ops)), bench(lambda: call(ref))
        out.append(dict(op=name, kernel_ms=t_k, torch_ms=t_r, speedup=t_r / t_k))
        print(f"{name:<15}{t_k:>10.4f}{t_r:>10.4f}{t_r / t_k:>9.1f}")
    return out


def forward(device: str, images: list[int], count: int, deadline: float) -> list[dict]:
    from vqdiff.model.net.transformer import VQDiffusionTransformer

    cfg = ithq().transformer
    torch.manual_seed(0)
    with torch.device(device):
        net = VQDiffusionTransformer(cfg).to(torch.bfloat16).eval()
    sched = Schedule(DiffusionConfig(num_classes=cfg.num_embed))
    n, k = cfg.num_tokens, cfg.num_embed
    params = sum(q.numel() for q in net.parameters())
    print(f"\nforward: ITHQ transformer, {params / 1e6:.0f} M parameters, bf16, random weights, text k/v cached")
    print(f"{'images':>7}{'rows':>6}{'forward ms':>12}{'step kernel ms':>16}{'step torch ms':>15}{'step share':>12}")
    out = []
    for b in images:
        if time.monotonic() > deadline:
            print("forward: stopped at the budget")
            break
        rows = 2 * b
        x = torch.full((b, n), k, device=device)
        t = torch.full((rows,), 50, device=device)
        with torch.inference_mode():
            kv = net.text_kv(torch.randn(rows, 77, cfg.text_dim, device=device, dtype=torch.bfloat16))
            fwd = lambda: net(torch.cat([x, x]), t, text_kv=kv)  # noqa: E731
            t_f = bench(fwd, reps=200)
            logits = fwd()  # (2B, N, K)
            p = rows_params(b, count, device)

            def step(backend):
                os.environ["VQDIFF_KERNELS"] = backend
                return denoise_step(logits[:b], logits[b:], x, p, sched)

            t_k, t_r = bench(lambda: step("triton")), bench(lambda: step("torch"))
        os.environ.pop("VQDIFF_KERNELS", None)
        share = t_k / (t_f + t_k)
        out.append(dict(images=b, rows=rows, forward_ms=t_f, step_kernel_ms=t_k, step_torch_ms=t_r,
                        step_share_kernels=share, step_share_torch=t_r / (t_f + t_r)))
        print(f"{b:>7}{rows:>6}{t_f:>12.2f}{t_k:>16.3f}{t_r:>15.3f}{100 * share:>11.1f}%")
        logits = kv = None  # free them (a rebinding, not del: the timed closures use them)
    return out


SECTIONS = ("ceiling", "configs", "draw", "step", "parts", "forward")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes under the Triton interpreter")
    args = ap.parse_args()
    start = time.monotonic()
    if torch.cuda.is_available():
        device, batches, n, k, gib, images, count = "cuda", [8, 32], 1024, 4096, 2.0, [1, 8, 32], 10
        print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    elif args.smoke:
        device, batches, n, k, gib, images, count = "cpu", [2], 16, 64, 0.01, [], 3
        print("smoke run: the interpreter's times, not the kernels'")
    else:
        print("gpu_sweep: no CUDA device (--smoke runs tiny shapes on the CPU)")
        return 0
    deadline = lambda share: start + share * args.budget_s  # noqa: E731
    res: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    copy_tbs = None
    if "ceiling" in args.sections:
        res["ceiling"] = ceiling(device, gib)
        copy_tbs = res["ceiling"]["tb_per_s"] if device == "cuda" else None
    if "configs" in args.sections:
        res["configs"] = configs(device, batches, n, k, copy_tbs, deadline(0.3))
    if "draw" in args.sections:
        res["draw"] = draw(device, [1] + batches[-1:], n, k, count, deadline(0.55))
    if "step" in args.sections:
        res["step"] = graphed(device, [1] + batches, n, k, count)
    if "parts" in args.sections:
        res["parts"] = parts(device, batches[-1], n, k, count)
    if "forward" in args.sections and images:
        try:
            res["forward"] = forward(device, images, count, deadline(1.0))
        except torch.OutOfMemoryError as e:
            print(f"forward: out of memory: {e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
