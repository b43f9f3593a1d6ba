"""Sampling: a request's plan, its state, one batched step over many requests, and ``sample()``.

``advance`` is the unit the server's batching engine calls: ONE transformer forward over the cond
and uncond rows of every request given (each at its own step, with its own timestep and
parameters), then ``denoise_step``. ``sample`` is the offline loop around it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import Tensor

from vqdiff.model.diffusion import Schedule, timestep_for_mask_fraction
from vqdiff.model.sampling.params import (
    POSTERIOR_SAMPLERS, SAMPLERS, SELECTION_SAMPLERS, GenerationParams, split_defaults,
)
from vqdiff.model.sampling.rng import random_seed
from vqdiff.model.sampling.step import POSTERIOR, PURITY, RANDOM, BatchParams, StepOutput, denoise_step

KIND = {"purity": PURITY, "random": RANDOM, "posterior": POSTERIOR, "skip": POSTERIOR}


@dataclass(frozen=True)
class Plan:
    """What each forward of a request does. For every step i: ``timesteps[i]`` is fed to the network;
    selection samplers unmask ``counts[i]`` tokens; posterior samplers evaluate the posterior at
    ``t_eval[i]`` (i.e. jump to x at t_eval[i] - 1; 0 means draw x0)."""

    timesteps: tuple[int, ...]
    counts: tuple[int, ...]
    t_eval: tuple[int, ...]

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def plan(sampler: str, steps: int, num_tokens: int, schedule: Schedule, masked: int | None = None,
         unmask_schedule: str = "linear") -> Plan:
    """The schedule of one request.

    purity / random (Sec. 3.2): the M masked tokens (``masked``; None: all N, a generation; fewer: an
    edit, model/sampling/edit.py) unmasked over ``steps`` forwards, at least one each, spread by
    ``unmask_schedule`` (``masked_left``); the timestep is the one whose mask probability is nearest
    the current masked fraction of the N (argmin |fraction - ctt[t]|).
    posterior: t = T-1, ..., 0. skip: ``steps`` timesteps evenly spaced from T-1 down to 0; each forward
    evaluates the posterior one step above the next visited timestep (the released fast sampler).
    """
    T = schedule.num_timesteps
    if sampler in POSTERIOR_SAMPLERS:
        if not 1 <= steps <= T:
            raise ValueError(f"steps: {steps} is not allowed for sampler {sampler!r}; expected 1..{T}")
        if steps == 1:
            ts = [T - 1]
        else:
            ts = sorted({round((T - 1) * (steps - 1 - i) / (steps - 1)) for i in range(steps)}, reverse=True)
        t_eval = [nxt + 1 for nxt in ts[1:]] + [0]
        return Plan(timesteps=tuple(ts), counts=(0,) * len(ts), t_eval=tuple(t_eval))

    m = num_tokens if masked is None else masked
    if not 1 <= m <= num_tokens:
        raise ValueError(f"masked: {m} tokens is not allowed; expected 1..{num_tokens}")
    if not 1 <= steps <= m:
        raise ValueError(f"steps: {steps} is not allowed for sampler {sampler!r}; expected 1..{m}"
                         + ("" if m == num_tokens else f" (the {m} tokens to repaint)"))
    left = masked_left(m, steps, unmask_schedule)  # (steps + 1,): m, ..., 0
    counts = [left[i] - left[i + 1] for i in range(steps)]
    ts = timestep_for_mask_fraction(schedule, torch.tensor(left[:-1], dtype=torch.float64) / num_tokens)  # (steps,)
    return Plan(timesteps=tuple(ts.tolist()), counts=tuple(counts), t_eval=(0,) * steps)


def masked_left(m: int, steps: int, unmask_schedule: str = "linear") -> list[int]:
    """Tokens still masked before each of ``steps`` forwards, and after the last (0): m tokens down
    by at least one per forward. linear: m - floor(i m / steps), Δz constant to within one token
    (the paper's). cosine: round(m cos(pi/2 i / steps)), then nudged so that every forward unmasks at
    least one: few tokens in the first forwards, more in the last (docs/RESULTS.md measures both)."""
    if unmask_schedule == "linear":
        return [m - i * m // steps for i in range(steps)] + [0]
    if unmask_schedule != "cosine":
        raise ValueError(f"unmask_schedule: {unmask_schedule!r} is not allowed; expected linear or cosine")
    left = [m] + [round(m * math.cos(math.pi / 2 * i / steps)) for i in range(1, steps)] + [0]
    for i in range(1, steps):  # at least one token per forward, from both ends
        left[i] = min(left[i], left[i - 1] - 1)
    for i in range(steps - 1, 0, -1):
        left[i] = max(left[i], left[i + 1] + 1)
    return left


@dataclass
class RequestState:
    """One request in flight: resolved params, plan, tokens, cached text keys/values, progress."""

    params: GenerationParams  # resolved (seed and uncond filled in)
    plan: Plan
    tokens: Tensor  # (N,) long; MASK_ID where still masked
    text_kv: Tensor  # (layers, 2, 2, H, L, Dh): cond and uncond rows of this request
    step: int = 0
    purity: Tensor | None = field(default=None, repr=False)  # (N,) after the last step

    @property
    def done(self) -> bool:
        return self.step >= self.plan.steps

    def row(self) -> dict:
        p, i = self.params, self.step
        return {
            "guidance_scale": p.guidance_scale, "truncation_rate": p.truncation_rate,
            "purity_weight": p.purity_weight if p.sampler == "purity" else 0.0, "kind": KIND[p.sampler],
            "seed": p.seed, "step": i, "count": self.plan.counts[i], "t_eval": self.plan.t_eval[i],
        }


def guided(states: list[RequestState]) -> list[int]:
    """The requests that need an unconditional row: guidance_scale != 1. At 1, Eq. 7's
    uncond + 1 * (cond - uncond) is the cond branch alone, so its uncond row is never run."""
    return [i for i, s in enumerate(states) if s.params.guidance_scale != 1.0]


def forward_rows(states: list[RequestState]) -> int:
    """Rows of one forward over ``states``: a cond row each, an uncond row each guided one."""
    return len(states) + len(guided(states))


def batch_text_kv(states: list[RequestState]) -> Tensor:
    """(layers, 2, B + G, H, L, Dh): the cond rows of all requests, then the uncond rows of the G
    guided ones (``guided``). Fixed while the batch's membership is, so a caller stepping the same
    requests again may keep it."""
    g = guided(states)
    return torch.cat([s.text_kv[:, :, :1] for s in states] + [states[i].text_kv[:, :, 1:] for i in g], dim=2)


@torch.no_grad()
def advance(transformer, schedule: Schedule, states: list[RequestState], text_kv: Tensor | None = None,
            forward=None) -> StepOutput:
    """One step for every request in ``states`` (none may be done): one forward of B + G rows (a
    cond row each, an uncond row each of the G with guidance: ``guided``).
    ``text_kv``: ``batch_text_kv(states)`` if the caller has it already (it may hold padding rows
    beyond the 2B: ``forward`` pads to its bucket, ``buckets.BucketedForward``). ``forward``: what
    runs the transformer (default: ``transformer`` itself, eager)."""
    if not states or any(s.done for s in states):
        raise ValueError("advance needs a non-empty list of unfinished requests")
    device = states[0].tokens.device
    b, g = len(states), guided(states)
    x = torch.stack([s.tokens for s in states])  # (B, N)
    t = torch.tensor([s.plan.timesteps[s.step] for s in states], device=device)  # (B,)
    kv = batch_text_kv(states) if text_kv is None else text_kv  # (layers, 2, B + G, H, L, Dh)
    if len(g) == b:
        rows_x, rows_t = torch.cat([x, x]), torch.cat([t, t])  # (2B, N), (2B,)
    else:
        idx = torch.tensor(g, dtype=torch.long, device=device)
        rows_x, rows_t = torch.cat([x, x[idx]]), torch.cat([t, t[idx]])  # (B + G, N), (B + G,)
    logits = (forward or transformer)(rows_x, rows_t, text_kv=kv)  # (B + G, N, K)
    cond = logits[:b]  # (B, N, K)
    if len(g) == b:
        uncond = logits[b:]
    else:  # an unguided row's uncond is its cond: uncond + 1 * (cond - uncond) is then cond exactly
        uncond = cond.clone()
        uncond[idx] = logits[b:]
    out = denoise_step(cond, uncond, x, BatchParams.build([s.row() for s in states], device), schedule)
    for i, s in enumerate(states):
        s.tokens, s.purity, s.step = out.tokens[i], out.purity[i], s.step + 1
    return out


def default_params(model, sampler: str | None = None) -> GenerationParams:
    """The model folder's defaults (``vqdiff.json``), else the released ones with steps capped at N.

    ``sampler``: the defaults for that sampler. Steps are per sampler: ``posterior`` always takes the
    model's T forwards; any other sampler than the folder's own keeps the folder's forward budget,
    capped at what it allows (``skip``: T; ``purity`` / ``random``: N)."""
    c = model.config.transformer
    fields, _ = split_defaults(model.generation_defaults)
    base = GenerationParams.from_dict(fields, GenerationParams(steps=min(100, c.num_tokens)))
    if sampler is None or sampler == base.sampler:
        return base
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: {sampler!r} is not allowed; expected one of {list(SAMPLERS)}")
    steps = {"posterior": c.num_timesteps, "skip": min(base.steps, c.num_timesteps)}.get(
        sampler, min(base.steps, c.num_tokens))
    return replace(base, sampler=sampler, steps=steps)


def request_params(model, given: dict) -> GenerationParams:
    """A request's parameters: the fields it gave over the defaults of the sampler it names, and,
    for a selection sampler at no more steps than the model folder's few-steps rule names
    (``params.split_defaults``), that rule's values for the fields it did not give."""
    p = GenerationParams.from_dict(given, default_params(model, given.get("sampler")))
    _, rule = split_defaults(model.generation_defaults)
    if rule is None or p.sampler not in SELECTION_SAMPLERS or p.steps > rule["max_steps"]:
        return p
    return replace(p, **{k: v for k, v in rule.items() if k != "max_steps" and k not in given})


@torch.no_grad()
def start(model, prompts: list[str], params: list[GenerationParams],
          inits: list[Tensor | None] | None = None) -> list[RequestState]:
    """Admit requests: resolve params, encode every text once (batched), cache cross-attention k/v.
    ``inits``: each row's starting grid (N,) with MASK_ID where it is to be drawn (an edit,
    model/sampling/edit.py), or None (all masked: a generation)."""
    c = model.config.transformer
    resolved = [
        p.resolve(num_tokens=c.num_tokens, num_timesteps=c.num_timesteps, has_null=model.null_cond is not None,
                  seed=random_seed())
        for p in params
    ]
    if not prompts:
        return []
    cond = model.encode_text(prompts)  # (B, L, D)
    uncond = torch.empty_like(cond)
    rows_of: dict[str, list[int]] = {}
    for i, p in enumerate(resolved):
        rows_of.setdefault(p.uncond, []).append(i)
    for kind, rows in rows_of.items():  # one text-encoder call per kind of unconditional branch
        if kind == "null":
            uncond[rows] = model.null_text(len(rows)).to(cond)
        else:
            uncond[rows] = model.encode_text([resolved[i].negative_prompt if kind == "negative" else "" for i in rows])
    text = torch.stack([cond, uncond], dim=1).flatten(0, 1)  # (2B, L, D): [cond_0, uncond_0, cond_1, ...]
    kv = model.transformer.text_kv(text.to(next(model.transformer.parameters()).dtype))  # (layers, 2, 2B, H, L, Dh)
    empty = torch.full((c.num_tokens,), c.mask_id, dtype=torch.long, device=model.device)
    inits = inits if inits is not None else [None] * len(resolved)
    if len(inits) != len(resolved):
        raise ValueError(f"{len(resolved)} prompts but {len(inits)} starting grids")
    states = []
    for i, (p, x) in enumerate(zip(resolved, inits)):
        # an edit's masked count: one host read per edit, at admission
        masked = None if x is None else int((x == c.mask_id).sum())
        x = empty.clone() if x is None else x.to(model.device, torch.long).clone()  # (N,)
        states.append(RequestState(params=p, plan=plan(p.sampler, p.steps, c.num_tokens, model.schedule, masked,
                                                       p.unmask_schedule),
                                   tokens=x, text_kv=kv[:, :, 2 * i : 2 * i + 2]))
    return states


@dataclass
class SampleResult:
    images: Tensor | None  # (B, 3, H, W) in [0, 1]; None when sampled with decode=False
    tokens: Tensor  # (B, N)
    params: list[GenerationParams]  # as resolved (seeds filled in)


@torch.no_grad()
def sample(
    model, prompts: list[str], params: GenerationParams | list[GenerationParams] | None = None,
    on_step: Callable[[list[RequestState]], None] | None = None, decode: bool = True,
    inits: list[Tensor | None] | None = None,
) -> SampleResult:
    """Generate one image per prompt. Requests may have different samplers and step counts; each
    step runs one forward over the requests still running. ``decode=False``: tokens only (a caller
    that decodes them its own way, e.g. one grid at a time). ``inits``: ``start``'s starting grids
    (edits: ``edit.edit`` builds them)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if params is None:
        params = default_params(model)
    if isinstance(params, GenerationParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} params")
    states = start(model, prompts, params, inits)
    kv, kv_of = None, None  # the batch's text k/v, rebuilt only when a request finishes
    while running := [s for s in states if not s.done]:
        if kv_of != len(running):  # requests only ever leave, so the count names the membership
            kv, kv_of = batch_text_kv(running), len(running)
        advance(model.transformer, model.schedule, running, text_kv=kv)
        if on_step is not None:
            on_step(states)
    tokens = torch.stack([s.tokens for s in states])  # (B, N)
    images = model.decode(tokens) if decode else None  # (B, 3, H, W)
    return SampleResult(images=images, tokens=tokens, params=[s.params for s in states])
