"""Ours against diffusers' VQDiffusionPipeline: the same model folder, the same machine, one run.

    .venv/bin/python benchmarks/bench_diffusers.py                 # the embedded default model, CPU
    .venv/bin/python benchmarks/bench_diffusers.py --quick         # the same table in under 2 minutes
    python benchmarks/bench_diffusers.py --device cuda --dtype bf16 --ithq-random /tmp/ithq-random --quick

Both sides load the same folder (diffusers through ``VQDiffusionPipeline.from_pretrained``, ours
through ``load_model``), run fp32 (or, with --dtype bf16, the transformer in bf16 on both sides and
everything else fp32: our step upcasts the logits, and diffusers' transformer is wrapped to take bf16
text and return fp32 log p) with the same number of torch threads (1 unless --threads), and
are timed in alternating trials (the order of the variants reverses every trial), so that drift of
a shared machine hits every variant alike. Before timing, the script checks that the two read the
same weights: text features, null condition and one transformer forward are compared (the maximum
differences are printed; above 1e-3 the run stops: that would be two different models).

(1) One image. diffusers at ``num_inference_steps`` = T (its only sampler, the posterior, T = 100
forwards) against our ``posterior`` sampler (T forwards), at the same guidance scale (both use
log p = uncond + scale * (cond - uncond) with the learnable null), the same truncation rate and
T steps; and against ours at the model's own defaults (``default_params``: the purity sampler,
fewer forwards). Ours is timed through the library (``sample`` with decode) and as one HTTP request
to a real ``vqdiff serve`` (JSON answer: PNG encode and base64 included).

(2) --prompts different prompts (16). diffusers' one batched call (all prompts in one ``pipe(...)``)
against as many concurrent requests to the same ``vqdiff serve`` (one image each), at equal forwards
and at our defaults; with --library-batch, ours through the library's one ``sample`` call of all
prompts as well (the model core without the server).

The server is started by the script on a free loopback port with the same folder,
``--intra-op-threads`` = --threads, ``--grpc-port 0`` and ``--dtype`` = --dtype, and stopped at the
end. Its two decode threads (``--decode-workers``, default 2) may run beside its step loop: on this
project's 2-core CPU the server can use both cores for a moment while the in-process sides use one.

Seeds: image i of a batch has seed i on our side; diffusers draws from one ``torch.Generator``
seeded 0. The two draw different noise (ours is counter-based per request), so their images are
not the same ones; the work per forward is.

--quick: part (1) 3 trials (at full steps), part (2) one trial with every forward count divided by
4 (diffusers 25 steps against our ``skip`` sampler at 25 forwards, each of them a posterior step
like the full run's; our defaults at a quarter of their forwards). The ratios are of the same
things; diffusers' 25-step images are not meaningful (it does not re-space its schedule), only its
time is.

--breakdown: after the trials, one more pass of diffusers and of our library at equal forwards,
with each side's transformer forward timed apart from the rest (text, guidance, truncation, the
step, decode).

--ithq-random DIR writes (once; an existing folder is reused) a random-weight model folder shaped
like ITHQ with diffusers' own classes and ``save_pretrained``: ``VQModel``, ``Transformer2DModel``
(36 layers, 16 heads x 88 = 1408 wide, 4096 classes + mask, 32 x 32 tokens, text 77 x 512),
``CLIPTextModel`` (CLIP ViT-B/32's text shape), ``VQDiffusionScheduler`` and
``LearnedClassifierFreeSamplingEmbeddings`` (77 x 512), fp32 (5.6 GB on disk), then benchmarks it.
The tokenizer is the embedded model's (no CLIP BPE vocabulary is available offline here) with
model_max_length 77; its words are those of the shapes prompts the benchmark sends.
--random-preset tiny writes a test-sized folder of the same layout (a check of the path on a CPU);
--write-only stops after writing and reading back the configs.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the server sets it (server/threads.py)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import ROOT, free_port  # noqa: E402

from vqdiff.model.io.default import EMBEDDED  # noqa: E402
from vqdiff.model.io.folder import load_model, read_config  # noqa: E402
from vqdiff.model.sampling.params import GenerationParams  # noqa: E402
from vqdiff.model.sampling.sampler import default_params, sample  # noqa: E402
from vqdiff.model.shapes.scenes import prompt_set  # noqa: E402

QUICK_DIV = 4  # --quick: part (2)'s forward counts are divided by this


# ---------------------------------------------------------------------------------------------
# diffusers' side


def _diffusers():
    """diffusers, quiet, with LearnedClassifierFreeSamplingEmbeddings where model_index.json looks
    for it (docs/DESIGN.md, section 8: the module moved in diffusers 0.42, so a plain
    ``VQDiffusionPipeline.from_pretrained`` of a VQ-Diffusion folder fails without this)."""
    import diffusers
    import transformers
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
        LearnedClassifierFreeSamplingEmbeddings,
        VQDiffusionPipeline,
    )

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*deprecated.*")
    if not hasattr(diffusers, "LearnedClassifierFreeSamplingEmbeddings"):
        diffusers.LearnedClassifierFreeSamplingEmbeddings = LearnedClassifierFreeSamplingEmbeddings
    return diffusers, VQDiffusionPipeline, LearnedClassifierFreeSamplingEmbeddings


def load_pipeline(folder: Path, device: str):
    _, VQDiffusionPipeline, _ = _diffusers()
    pipe = VQDiffusionPipeline.from_pretrained(folder, dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bf16_transformer(pipe) -> None:
    """diffusers' transformer in bf16, taking the pipeline's fp32 text and returning fp32 log p, so
    that guidance, truncation and the scheduler run in fp32 as ours do (model/sampling/step.py)."""
    tr = pipe.transformer.to(torch.bfloat16)
    inner = tr.forward

    def forward(hidden_states, encoder_hidden_states=None, timestep=None, **kw):
        out = inner(hidden_states, encoder_hidden_states=encoder_hidden_states.to(torch.bfloat16),
                    timestep=timestep, **kw)
        out.sample = out.sample.float()  # (B, K, N)
        return out

    tr.forward = forward


def write_random_folder(out: Path, preset: str) -> Path:
    """A random-weight VQ-Diffusion folder written by diffusers' ``save_pretrained`` (module docstring)."""
    from transformers import CLIPTextModel

    from vqdiff.model.config import ithq, tiny
    from vqdiff.model.io.folder import transformer_config_to_diffusers, vqvae_config_to_diffusers
    from vqdiff.model.net.text_encoder import clip_config
    from vqdiff.model.net.tokenizer import load_tokenizer

    diffusers, VQDiffusionPipeline, Null = _diffusers()
    cfg = {"ithq": ithq, "tiny": tiny}[preset]()
    tok = load_tokenizer(EMBEDDED / "tokenizer")  # the embedded model's vocabulary (no CLIP BPE offline)
    tok.model_max_length = cfg.text_encoder.max_length
    if "max_length" in tok.init_kwargs:
        tok.init_kwargs["max_length"] = cfg.text_encoder.max_length
    text_cfg = cfg.text_encoder
    if len(tok) > text_cfg.vocab_size:
        text_cfg = replace(text_cfg, vocab_size=len(tok))
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    t0 = time.perf_counter()
    torch.manual_seed(0)
    transformer = diffusers.Transformer2DModel(**strip(transformer_config_to_diffusers(cfg.transformer)))
    vqvae = diffusers.VQModel(**strip(vqvae_config_to_diffusers(cfg.vqvae)))
    clip = CLIPTextModel(clip_config(text_cfg, tok))
    null = Null(learnable=True, hidden_size=text_cfg.hidden_size, length=text_cfg.max_length)
    with torch.no_grad():
        null.embeddings.normal_(0.0, text_cfg.hidden_size ** -0.5)  # zeros by default; any values time alike
    scheduler = diffusers.VQDiffusionScheduler(num_vec_classes=cfg.transformer.num_embed + 1,
                                               num_train_timesteps=cfg.transformer.num_timesteps)
    pipe = VQDiffusionPipeline(vqvae=vqvae, text_encoder=clip, tokenizer=tok, transformer=transformer,
                               scheduler=scheduler, learned_classifier_free_sampling_embeddings=null)
    built = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    pipe.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, out)
    n = sum(p.numel() for p in transformer.parameters())
    print(f"wrote {out}: random {preset}-shaped folder by diffusers' save_pretrained, transformer "
          f"{n:,} parameters (built {built:.0f} s, written {time.perf_counter() - t0 - built:.0f} s)",
          flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# the server


class Server:
    """``vqdiff serve`` on a free loopback port (as benchmarks/bench_server.py starts it)."""

    def __init__(self, folder: Path, device: str, threads: int, max_rows: int, dtype: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()  # not a pipe: a full pipe would stall the server's logging
        cmd = [sys.executable, "-m", "vqdiff.cli", "serve", "--model", str(folder), "--host", "127.0.0.1",
               "--http-port", str(self.port), "--grpc-port", "0", "--intra-op-threads", str(threads),
               "--device", device, "--dtype", dtype, "--max-rows", str(max_rows)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log, env=os.environ.copy())

    def wait_ready(self, timeout_s: float = 600) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited: {self.tail()}")
            time.sleep(0.1)
        raise SystemExit(f"the server was not ready in {timeout_s:.0f} s: {self.tail()}")

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]

    def threads_line(self) -> str:
        self.log.seek(0)
        lines = [ln for ln in self.log.read().decode(errors="replace").splitlines() if "threads:" in ln]
        return lines[0].split("threads: ")[-1] if lines else "no thread log line"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def generate(self, bodies: list[dict]) -> tuple[float, list[dict]]:
        """Wall seconds until the last of ``bodies`` (sent all at once, plain JSON) is answered."""

        async def go():
            limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=len(bodies) + 4)
            async with httpx.AsyncClient(timeout=3600, limits=limits) as client:

                async def one(body):
                    r = await client.post(f"{self.url}/v1/generate", json=body)
                    if r.status_code != 200:
                        raise SystemExit(f"the server answered {r.status_code}: {r.text[:500]}")
                    return r.json()

                t0 = time.perf_counter()
                out = await asyncio.gather(*(one(b) for b in bodies))
                return time.perf_counter() - t0, out

        return asyncio.run(go())


# ---------------------------------------------------------------------------------------------
# measurement


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_same_model(pipe, model, prompt: str, device: str) -> tuple[float, float]:
    """max |difference| of (text features and null condition, one transformer forward's log p)."""
    with torch.no_grad():
        emb = pipe._encode_prompt(prompt, 1, True)  # (2, L, D): [null; text]
        ours = torch.cat([model.null_text(1), model.encode_text([prompt])]).to(emb)
        text_err = (emb - ours).abs().max().item()
        c = model.config.transformer
        g = torch.Generator().manual_seed(1)
        x_t = torch.randint(0, c.num_embed, (2, c.num_tokens), generator=g)
        x_t[:, ::3] = c.mask_id  # (2, N)
        x_t = x_t.to(device)
        t = 50 % c.num_timesteps
        want = pipe.transformer(x_t, encoder_hidden_states=emb, timestep=torch.tensor(t, device=device)).sample
        got = model.transformer.log_probs(x_t, torch.full((2,), t, device=device), emb).transpose(1, 2)
        return text_err, (want - got).abs().max().item()


class timed_forward:
    """Adds the seconds of every call of ``module``'s forward to ``acc[key]`` while active."""

    def __init__(self, module, acc: dict, key: str, device: str):
        self.module, self.acc, self.key, self.device = module, acc, key, device

    def __enter__(self):
        self.had = "forward" in self.module.__dict__
        inner = self.saved = self.module.forward

        def forward(*a, **k):
            sync(self.device)
            t0 = time.perf_counter()
            out = inner(*a, **k)
            sync(self.device)
            self.acc[self.key] += time.perf_counter() - t0
            return out

        self.module.forward = forward
        return self

    def __exit__(self, *exc):
        if self.had:
            self.module.forward = self.saved
        else:
            del self.module.forward


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def trials(variants: dict, n: int, label: str) -> dict[str, dict]:
    """Run every variant once per trial, the order reversed on odd trials; seconds per variant."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for i in range(n):
        order = names if i % 2 == 0 else names[::-1]
        line = []
        for k in order:
            s = variants[k]()
            times[k].append(s)
            line.append(f"{k} {s:.2f}s")
        print(f"  {label} trial {i + 1}/{n}: " + ", ".join(line), flush=True)
    return {k: stats(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", type=Path, help="model folder (default: the embedded default model)")
    ap.add_argument("--trials", type=int, help="trials of part (2) (default 3; --quick 1)")
    ap.add_argument("--single-trials", type=int, help="trials of part (1) (default 5; --quick 3)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts of part (2) (default 16)")
    ap.add_argument("--parts", default="1,2", help="parts to run: 1, 2 or 1,2")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="the transformer's dtype on both sides (default fp32; bf16: the usual choice on a GPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, here and the server's (default 1)")
    ap.add_argument("--quick", action="store_true", help="fewer trials and forwards (module docstring)")
    ap.add_argument("--library-batch", action="store_true",
                    help="part (2) also times ours through the library: one sample() call of all prompts")
    ap.add_argument("--breakdown", action="store_true",
                    help="after the trials, one pass of each side at equal forwards with the transformer timed apart")
    ap.add_argument("--ithq-random", type=Path, metavar="DIR",
                    help="write (unless it exists) a random ITHQ-shaped folder with diffusers' save_pretrained, use it")
    ap.add_argument("--random-preset", default="ithq", choices=["ithq", "tiny"],
                    help="shape of the --ithq-random folder (tiny: a check of the path on a CPU)")
    ap.add_argument("--write-only", action="store_true", help="with --ithq-random: write the folder and stop")
    args = ap.parse_args()
    t_start = time.perf_counter()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    if args.ithq_random:
        if args.model:
            raise SystemExit("--model and --ithq-random exclude each other")
        if (args.ithq_random / "model_index.json").is_file():
            print(f"reusing {args.ithq_random} (model_index.json exists)")
        else:
            args.ithq_random.parent.mkdir(parents=True, exist_ok=True)
            write_random_folder(args.ithq_random, args.random_preset)
        cfg = read_config(args.ithq_random)  # our reader takes diffusers' folder
        print(f"read back: {cfg.transformer.num_layers} layers, {cfg.transformer.num_heads} x "
              f"{cfg.transformer.head_dim} wide, {cfg.transformer.num_embed} classes, {cfg.transformer.height} x "
              f"{cfg.transformer.width} tokens, text {cfg.text_encoder.max_length} x {cfg.text_encoder.hidden_size}")
        if args.write_only:
            return
        args.model = args.ithq_random
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine: the --device cuda benchmark is skipped.")
        return
    folder = args.model or EMBEDDED
    parts = {int(p) for p in args.parts.split(",")}
    n_trials = args.trials or (1 if args.quick else 3)
    n_single = args.single_trials or (3 if args.quick else 5)
    div = QUICK_DIV if args.quick else 1
    dev = args.device
    import diffusers

    server = Server(folder, dev, args.threads, max_rows=max(64, 2 * args.prompts), dtype=args.dtype)
    try:
        model = load_model(folder, device=dev)
        pipe = load_pipeline(folder, dev)
        c = model.config.transformer
        T = c.num_timesteps
        dflt = default_params(model)  # the folder's defaults: sampler, forwards, guidance, truncation
        g, r = dflt.guidance_scale, dflt.truncation_rate
        prompts = [p for p, _ in prompt_set("two", n=max(args.prompts, 1))][: args.prompts]
        one_prompt = prompts[0]
        text_err, lp_err = check_same_model(pipe, model, one_prompt, dev)  # in fp32, before any cast
        print(f"same model: max |diff| text + null {text_err:.1e}, log p of one forward {lp_err:.1e}", flush=True)
        if max(text_err, lp_err) > 1e-3:
            raise SystemExit("the two sides do not compute the same model; not timing them")
        if args.dtype == "bf16":
            model.transformer.to(torch.bfloat16)  # what load_model(dtype=bf16) and the server do
            bf16_transformer(pipe)
        server.wait_ready()

        def eq_params(steps: int, seed: int) -> GenerationParams:
            """Equal forwards to diffusers at ``steps``: the posterior sampler at T, else skip (--quick)."""
            sampler = "posterior" if steps == T else "skip"
            return GenerationParams(sampler=sampler, steps=steps, guidance_scale=g, truncation_rate=r, seed=seed)

        def def_params(steps: int, seed: int) -> GenerationParams:
            return replace(dflt, steps=steps, seed=seed)

        def run_diffusers(batch: list[str], steps: int):
            def f():
                t0 = time.perf_counter()
                pipe(batch, num_inference_steps=steps, guidance_scale=g, truncation_rate=r,
                     generator=torch.Generator(device=dev).manual_seed(0), output_type="np")
                sync(dev)
                return time.perf_counter() - t0
            return f

        def run_library(batch: list[str], make, steps: int):
            ps = [make(steps, i) for i in range(len(batch))]

            def f():
                t0 = time.perf_counter()
                sample(model, batch, ps)
                sync(dev)
                return time.perf_counter() - t0
            return f

        def run_server(batch: list[str], make, steps: int, explicit: bool):
            bodies = []
            for i, p in enumerate(batch):
                want = make(steps, i)
                body = {"prompt": p, "seed": i}
                if explicit:  # else the server's defaults, checked below to be ``want``
                    body.update(sampler=want.sampler, steps=want.steps, guidance_scale=g, truncation_rate=r)
                bodies.append((body, want))

            def f():
                wall, out = server.generate([b for b, _ in bodies])
                for (_, want), res in zip(bodies, out):
                    got = res["params"]
                    if (got["sampler"], got["steps"], got["guidance_scale"], got["truncation_rate"]) != (
                            want.sampler, want.steps, want.guidance_scale, want.truncation_rate):
                        raise SystemExit(f"the server ran {got}, not {want}")
                return wall
            return f

        # warm-up: every path once, two forwards
        run_diffusers(prompts[:2], 2)()
        run_library(prompts[:2], lambda s, i: replace(dflt, steps=2, seed=i), 2)()
        run_server(prompts[:2], lambda s, i: replace(dflt, steps=2, seed=i), 2, explicit=True)()

        rows = []  # (part, what, forwards ours, forwards diffusers, images, diffusers stats, ours stats)
        if 1 in parts:
            print(f"part 1: one image, {n_single} trials", flush=True)
            batch = [one_prompt]
            res = trials({
                "diffusers": run_diffusers(batch, T),
                "lib-eq": run_library(batch, eq_params, T),
                "lib-def": run_library(batch, def_params, dflt.steps),
                "http-eq": run_server(batch, eq_params, T, explicit=True),
                "http-def": run_server(batch, def_params, dflt.steps, explicit=False),
            }, n_single, "part 1")
            d = res["diffusers"]
            rows += [
                ("1 image", "ours, library, posterior", T, T, 1, d, res["lib-eq"]),
                ("1 image", "ours, HTTP server, posterior", T, T, 1, d, res["http-eq"]),
                ("1 image", f"ours, library, defaults ({dflt.sampler})", dflt.steps, T, 1, d, res["lib-def"]),
                ("1 image", f"ours, HTTP server, defaults ({dflt.sampler})", dflt.steps, T, 1, d, res["http-def"]),
            ]
        if 2 in parts:
            n = len(prompts)
            steps_d, steps_def = max(1, T // div), max(1, dflt.steps // div)
            print(f"part 2: {n} prompts, {n_trials} trials, diffusers at {steps_d} steps", flush=True)
            variants = {
                "diffusers": run_diffusers(prompts, steps_d),
                "http-eq": run_server(prompts, eq_params, steps_d, explicit=True),
                "http-def": run_server(prompts, def_params, steps_def, explicit=steps_def != dflt.steps),
            }
            if args.library_batch:
                variants["lib-eq"] = run_library(prompts, eq_params, steps_d)
                variants["lib-def"] = run_library(prompts, def_params, steps_def)
            res = trials(variants, n_trials, "part 2")
            d = res["diffusers"]
            eq_name = "posterior" if steps_d == T else "skip"
            rows += [(f"{n} prompts", f"ours, HTTP server, {n} concurrent requests, {eq_name}", steps_d, steps_d, n, d,
                      res["http-eq"]),
                     (f"{n} prompts", f"ours, HTTP server, {n} concurrent requests, defaults ({dflt.sampler})",
                      steps_def, steps_d, n, d, res["http-def"])]
            if args.library_batch:
                rows += [(f"{n} prompts", f"ours, library, one sample() call, {eq_name}", steps_d, steps_d, n, d,
                          res["lib-eq"]),
                         (f"{n} prompts", f"ours, library, one sample() call, defaults ({dflt.sampler})", steps_def,
                          steps_d, n, d, res["lib-def"])]
        split = []  # --breakdown: (case, diffusers total, its forwards, ours total, its forwards)
        if args.breakdown:
            cases = [(1, "1 image", [one_prompt], T), (2, f"{len(prompts)} prompts", prompts, max(1, T // div))]
            for _, case, batch, steps in [x for x in cases if x[0] in parts]:
                acc = {"d": 0.0, "o": 0.0}
                with timed_forward(pipe.transformer, acc, "d", dev), timed_forward(model.transformer, acc, "o", dev):
                    td, to = run_diffusers(batch, steps)(), run_library(batch, eq_params, steps)()
                split.append((case, td, acc["d"], to, acc["o"]))
        threads_line = server.threads_line()
    finally:
        server.stop()

    print()
    print(f"model {folder} ({sum(p.numel() for p in model.transformer.parameters()) / 1e6:.1f} M transformer "
          f"parameters, {c.height}x{c.width} tokens, {c.num_embed} classes, T = {T}), transformer {args.dtype} on {dev}")
    print(f"same model: max |diff| text + null {text_err:.1e}, log p of one forward {lp_err:.1e}")
    print(f"guidance {g} (uncond + scale * (cond - uncond), learnable null on both sides), truncation {r}; "
          f"our defaults: {dflt.sampler}, {dflt.steps} forwards")
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {torch.get_num_threads()} torch thread(s) "
          f"here; server: {threads_line}; machine {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs" + (f", {torch.cuda.get_device_name()}" if dev == "cuda" else ""))
    if args.quick:
        print(f"--quick: part 1 {n_single} trials; part 2 {n_trials} trial(s), forwards divided by {QUICK_DIV}")
    for case, td, fd, to, fo in split:
        print(f"breakdown, {case}, equal forwards (one untimed pass each, library): diffusers {td:.2f} s = "
              f"transformer {fd:.2f} s + the rest {td - fd:.2f} s; ours {to:.2f} s = transformer {fo:.2f} s + "
              f"the rest {to - fo:.2f} s (the rest: text, guidance, truncation, the step, decode)")
    print()
    print("| case | ours | forwards ours / diffusers | diffusers s | ours s | ours / diffusers time | "
          "diffusers images/s | ours images/s | throughput ours / diffusers |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    fmt = lambda s: f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]"  # noqa: E731
    for case, what, f_ours, f_d, imgs, d, o in rows:
        ratio = o["median"] / d["median"]
        print(f"| {case} | {what} | {f_ours} / {f_d} | {fmt(d)} | {fmt(o)} | {ratio:.2f} | "
              f"{imgs / d['median']:.2f} | {imgs / o['median']:.2f} | {1 / ratio:.2f}x |")
    counts = [f"{n} (part {p})" for p, n in ((1, n_single), (2, n_trials)) if p in parts]
    print(f"\nmedians of {' and '.join(counts)} trials, [min-max]; total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
