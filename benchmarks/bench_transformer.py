"""One transformer forward: ours against diffusers' Transformer2DModel with the same weights.

    .venv/bin/python benchmarks/bench_transformer.py [--layers 4] [--batch 2] [--repeat 5]

ITHQ's width (1408, 16 heads x 88), 1024 image tokens, 77 text tokens; fewer layers than ITHQ's 36 so
it runs on a CPU in seconds (time per layer is what compares). Both run in fp32 in one process, one
after the other, on the same inputs; the printed ratio is diffusers' time over ours. Ours is timed
twice: recomputing the text keys/values, and with them cached (what the server does every step).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import replace

import torch

from vqdiff.model.config import ithq
from vqdiff.model.io.folder import transformer_config_to_diffusers
from vqdiff.model.net.transformer import VQDiffusionTransformer


def timeit(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2, help="rows per forward (cond + uncond of one image = 2)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import diffusers  # benchmark-only dependency

    torch.manual_seed(0)
    cfg = replace(ithq().transformer, num_layers=args.layers)
    ours = VQDiffusionTransformer(cfg).eval()
    d_cfg = {k: v for k, v in transformer_config_to_diffusers(cfg).items() if not k.startswith("_")}
    theirs = diffusers.Transformer2DModel(**d_cfg).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)

    b = args.batch
    x_t = torch.randint(0, cfg.num_embed + 1, (b, cfg.num_tokens))  # (B, N)
    text = torch.randn(b, 77, cfg.text_dim)  # (B, L, D)
    t = torch.full((b,), 50)
    with torch.inference_mode():
        kv = ours.text_kv(text)
        err = (theirs(x_t, encoder_hidden_states=text, timestep=t[0]).sample
               - ours.log_probs(x_t, t, text).transpose(1, 2)).abs().max().item()
        t_theirs = timeit(lambda: theirs(x_t, encoder_hidden_states=text, timestep=t[0]), args.repeat)
        t_ours = timeit(lambda: ours(x_t, t, text), args.repeat)
        t_cached = timeit(lambda: ours(x_t, t, text_kv=kv), args.repeat)

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(f"config: ITHQ width, {args.layers} layers, batch {b}, N={cfg.num_tokens}, fp32; max |log p diff| = {err:.2e}")
    print(f"{'':28s} {'ms/forward':>10s} {'ms/layer':>9s} {'diffusers/ours':>15s}")
    for name, s in (("diffusers Transformer2DModel", t_theirs), ("ours", t_ours), ("ours, cached text k/v", t_cached)):
        print(f"{name:28s} {s * 1e3:10.1f} {s * 1e3 / args.layers:9.1f} {t_theirs / s:15.2f}")


if __name__ == "__main__":
    main()
