"""What bench_kernels.py's table needs around it on a GPU: the measured ceilings, guided_purity's launch
configurations, the step's parts, and the ITHQ forward the step follows.

    python benchmarks/gpu_sweep.py [--out sweep.json] [--budget-s 150]
    python benchmarks/gpu_sweep.py --smoke      # no GPU: tiny shapes under the Triton interpreter

1. ceiling   a device-to-device copy of 2 GiB (bytes read + written over time): the bandwidth a
             memory-bound kernel can reach on this card, beside the datasheet's.
2. configs   ``_guided_purity_kernel`` (purity only) at B = 32, N = 1024, K = 4096, fp32 and bf16, for
             ROWS positions a program x num_warps x PRECISE (libdevice exp/log, or the fast
             approximations): which launch reaches the ceiling, and whether the exact exp costs time.
3. parts     guided_purity, select_masked and draw_at alone, kernels vs references (B = 32, bf16).
4. forward   one ITHQ transformer forward (36 layers, random weights, bf16, text k/v cached) at 2, 16
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

import model.step as ref  # noqa: E402
from model.config import DiffusionConfig, ithq  # noqa: E402
from model.diffusion import Schedule  # noqa: E402
from model.step import PURITY, BatchParams, denoise_step  # noqa: E402

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


def configs(device: str, b: int, n: int, k: int, copy_tbs: float | None, deadline: float) -> list[dict]:
    import triton

    from kernels.guided import _guided_purity_kernel

    results = []
    print(f"\nconfigs: guided_purity, purity only, B={b} N={n} K={k}")
    print(f"{'dtype':<6}{'rows':>5}{'warps':>6}{'precise':>8}{'ms':>9}{'GB/s':>8}{'of copy':>9}  purity rel")
    for dname, dtype in DTYPES.items():
        g = torch.Generator(device=device).manual_seed(1)
        cond = (torch.randn(b, n, k, device=device, generator=g) * 3).to(dtype)
        uncond = (torch.randn(b, n, k, device=device, generator=g) * 3).to(dtype)
        p = rows_params(b, 10, device)
        want, _ = ref.guided_purity(cond, uncond, p.guidance_scale, p.truncation_rate)
        nbytes = 2 * cond.numel() * cond.element_size() + 4 * b * n
        block_k = triton.next_power_of_2(k)
        for rows in (1, 2):
            for warps in (4, 8, 16):
                for precise in (True, False) if device == "cuda" else (False,):  # no libdevice interpreted
                    if time.monotonic() > deadline:
                        print("configs: stopped at the budget")
                        return results
                    purity = torch.full((b, n), float("nan"), device=device)

                    def run():
                        _guided_purity_kernel[(triton.cdiv(b * n, rows),)](
                            cond, uncond, p.guidance_scale, p.truncation_rate, purity, purity, b * n, n, k,
                            ROWS=rows, BLOCK_K=block_k, WRITE_LOG_P=False, TRUNCATE=False, PRECISE=precise,
                            num_warps=warps, enable_fp_fusion=False)

                    try:
                        run()
                        rel = ((purity - want).abs() / want).max().item()
                        ms = bench(run)
                    except Exception as e:  # a configuration that does not compile is a result too
                        print(f"{dname:<6}{rows:>5}{warps:>6}{str(precise):>8}  failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:60]}")
                        continue
                    gbs = nbytes / (ms * 1e-3) / 1e9
                    frac = gbs / (copy_tbs * 1e3) if copy_tbs else None
                    results.append(dict(dtype=dname, rows=rows, warps=warps, precise=precise, ms=ms, gb_per_s=gbs,
                                        fraction_of_copy=frac, purity_rel=rel))
                    fr = f"{100 * frac:8.1f}%" if frac else "        -"
                    print(f"{dname:<6}{rows:>5}{warps:>6}{str(precise):>8}{ms:>9.4f}{gbs:>8.0f}{fr}  {rel:.1e}")
        del cond, uncond
    return results


def parts(device: str, b: int, n: int, k: int, count: int) -> list[dict]:
    from kernels import ops

    g = torch.Generator(device=device).manual_seed(2)
    cond = (torch.randn(b, n, k, device=device, generator=g) * 3).to(torch.bfloat16)
    uncond = (torch.randn(b, n, k, device=device, generator=g) * 3).to(torch.bfloat16)
    p = rows_params(b, count, device)
    x = torch.full((b, n), k, device=device)
    x[:, : n // 2] = torch.randint(0, k, (b, n // 2), device=device, generator=g)  # half unmasked: mid-sampling
    pur, _ = ref.guided_purity(cond, uncond, p.guidance_scale, p.truncation_rate)
    score = pur / pur.max(dim=-1, keepdim=True).values
    masked = x == k
    chosen = ref.select_masked(score, masked, p.count, p.seed, p.step)
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
    from model.transformer import VQDiffusionTransformer

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
        del logits, kv
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes under the Triton interpreter")
    args = ap.parse_args()
    start = time.monotonic()
    if torch.cuda.is_available():
        device, b, n, k, gib, images = "cuda", 32, 1024, 4096, 2.0, [1, 8, 32]
        print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    elif args.smoke:
        device, b, n, k, gib, images = "cpu", 2, 16, 64, 0.01, []
        print("smoke run: the interpreter's times, not the kernels'")
    else:
        print("gpu_sweep: no CUDA device (--smoke runs tiny shapes on the CPU)")
        return 0
    res: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    res["ceiling"] = ceiling(device, gib)
    copy_tbs = res["ceiling"]["tb_per_s"] if device == "cuda" else None
    res["configs"] = configs(device, b, n, k, copy_tbs, start + 0.45 * args.budget_s)
    res["parts"] = parts(device, b, n, k, 10 if device == "cuda" else 3)
    if images:
        try:
            res["forward"] = forward(device, images, 10, start + args.budget_s)
        except torch.OutOfMemoryError as e:
            print(f"forward: out of memory: {e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
