"""``GenerationParams``: every per-request knob, in one typed, validated object.

The names are the paper's (docs/DESIGN.md, sections 4-6: Guidance, Truncation, High-quality
inference). ``guidance_scale`` follows the released convention:
log p = uncond + guidance_scale * (cond - uncond), so 1.0 turns guidance off.
Invalid values raise ValueError naming the field, the value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

# how the transformer forward runs (the server's ``compile`` setting, model/sampling/buckets.py):
# eager, or one of torch.compile's modes ("reduce-overhead" captures CUDA graphs)
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")

SAMPLERS = ("purity", "random", "posterior", "skip")
SELECTION_SAMPLERS = ("purity", "random")  # unmask Δz positions per forward (Algorithms 2 and 1)
POSTERIOR_SAMPLERS = ("posterior", "skip")  # the original reverse process, full or skip-step
UNCONDS = ("auto", "null", "empty", "negative")
# how the selection samplers spread the tokens over their forwards (sampler.plan): linear keeps Δz
# constant (the paper's); cosine lets the masked fraction follow cos(pi/2 * i / steps), few tokens first
UNMASK_SCHEDULES = ("linear", "cosine")
MAX_GUIDANCE = 50.0
MAX_PURITY_WEIGHT = 20.0
SEED_MAX = 2**63 - 1


def _p(default, help: str):
    """A parameter: its default and its help text (the help of its ``vqdiff generate`` flag)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class GenerationParams:
    guidance_scale: float = _p(5.0, "classifier-free guidance: uncond + scale * (cond - uncond); 1.0 = no guidance")
    # what the unconditional branch uses: "null" the learnable null condition, "empty" the empty
    # prompt's embedding (zero-shot CF), "negative" the embedding of negative_prompt; "auto" = null
    # if the model has one, else empty.
    uncond: str = _p("auto", f"the unconditional branch: {' | '.join(UNCONDS)} (auto: null if the model has "
                             "a learnable null, else empty)")
    negative_prompt: str | None = _p(None, "the text of the unconditional branch (uncond negative)")
    truncation_rate: float = _p(1.0, "keep the most likely classes up to this mass; 1.0 = off")
    sampler: str = _p("purity", " | ".join(SAMPLERS))
    steps: int = _p(100, "transformer forward passes")
    purity_weight: float = _p(1.0, "r of Eq. 11 (purity sampler only)")
    unmask_schedule: str = _p("linear", "tokens unmasked per forward (purity / random): linear (the same every "
                                        "forward) | cosine (the masked fraction follows cos(pi/2 i/steps): few first)")
    seed: int | None = _p(None, "None: the server picks one and reports it")

    def __post_init__(self) -> None:
        _number(self, "guidance_scale", 1.0, MAX_GUIDANCE)
        _number(self, "truncation_rate", 0.0, 1.0, low_open=True)
        _number(self, "purity_weight", 0.0, MAX_PURITY_WEIGHT)
        _choice(self, "sampler", SAMPLERS)
        _choice(self, "uncond", UNCONDS)
        _choice(self, "unmask_schedule", UNMASK_SCHEDULES)
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"steps: {self.steps!r} is not allowed; expected an integer >= 1")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= SEED_MAX
        ):
            raise ValueError(f"seed: {self.seed!r} is not allowed; expected an integer in [0, 2^63 - 1]")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt: {self.negative_prompt!r} is not allowed; expected a string")
        has_negative = bool(self.negative_prompt)
        if self.uncond == "negative" and not has_negative:
            raise ValueError("uncond: 'negative' needs a non-empty negative_prompt")
        if has_negative and self.uncond not in ("negative", "auto"):
            raise ValueError(f"negative_prompt is given but uncond is {self.uncond!r}; use uncond 'negative'")

    @classmethod
    def from_dict(cls, d: dict[str, Any], defaults: GenerationParams | None = None) -> GenerationParams:
        """Fields from ``d`` (unknown keys are an error) over ``defaults``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown generation parameter(s) {unknown}; known: {sorted(known)}")
        return replace(defaults or cls(), **d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolve(self, *, num_tokens: int, num_timesteps: int, has_null: bool, seed: int | None = None) -> GenerationParams:
        """Check the parameters against a model and fill in what depends on it: the unconditional
        branch for "auto", and the seed (``seed`` is used when the request gave none)."""
        uncond = self.uncond
        if uncond == "auto":
            uncond = "negative" if self.negative_prompt else ("null" if has_null else "empty")
        if uncond == "null" and not has_null:
            raise ValueError("uncond: 'null' is not allowed: this model has no learnable null condition; use 'empty'")
        if self.sampler in SELECTION_SAMPLERS and self.steps > num_tokens:
            raise ValueError(
                f"steps: {self.steps} is not allowed for sampler {self.sampler!r}; expected 1..{num_tokens} "
                f"(at least one token per forward)")
        if self.sampler == "skip" and self.steps > num_timesteps:
            raise ValueError(f"steps: {self.steps} is not allowed for sampler 'skip'; expected 1..{num_timesteps}")
        if self.sampler == "posterior" and self.steps != num_timesteps:
            raise ValueError(
                f"steps: {self.steps} is not allowed for sampler 'posterior'; it must be {num_timesteps} "
                f"(the model's timesteps); use sampler 'skip' for fewer")
        if self.seed is None and seed is None:
            raise ValueError("seed: a seed is required to resolve the parameters")
        return replace(self, uncond=uncond, seed=self.seed if self.seed is not None else seed)


def _number(p: GenerationParams, name: str, lo: float, hi: float, low_open: bool = False) -> None:
    v = getattr(p, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (lo < v if low_open else lo <= v) and v <= hi
    if not ok:
        raise ValueError(f"{name}: {v!r} is not allowed; expected a number in {'(' if low_open else '['}{lo}, {hi}]")


def _choice(p: GenerationParams, name: str, allowed: tuple[str, ...]) -> None:
    v = getattr(p, name)
    if v not in allowed:
        raise ValueError(f"{name}: {v!r} is not allowed; expected one of {list(allowed)}")


FEW_STEPS = "few_steps"  # the key of generation defaults that apply at a small step count (below)


def split_defaults(defaults: dict) -> tuple[dict, dict | None]:
    """A model folder's generation defaults (``vqdiff.json``) as (GenerationParams fields, the
    few-steps rule or None). The rule, ``{"max_steps": S, field: value, ...}``, gives the selection
    samplers other defaults for a request of at most S steps (fewer tokens per forward call for other
    settings: a sharper draw, another spread); fields the request gives win. Raises ValueError naming
    the key on anything else."""
    fields_ = {k: v for k, v in defaults.items() if k != FEW_STEPS}
    GenerationParams.from_dict(fields_)
    rule = defaults.get(FEW_STEPS)
    if rule is None:
        return fields_, None
    if not isinstance(rule, dict) or not isinstance(rule.get("max_steps"), int) or isinstance(
            rule.get("max_steps"), bool) or rule["max_steps"] < 1:
        raise ValueError(f"{FEW_STEPS}: {rule!r} is not allowed; expected {{\"max_steps\": an integer >= 1, field: "
                         "value, ...}")
    values = {k: v for k, v in rule.items() if k != "max_steps"}
    if {"steps", "seed", "sampler"} & set(values):
        raise ValueError(f"{FEW_STEPS}: sets {sorted({'steps', 'seed', 'sampler'} & set(values))}; a few-steps rule "
                         "may not set steps, seed or sampler")
    GenerationParams.from_dict(values)
    return fields_, {"max_steps": rule["max_steps"], **values}


def image_seed(seed: int, i: int) -> int:
    """The seed of image ``i`` of a request with ``seed``: ``seed + i``, wrapping past 2^63 - 1 to 0."""
    return (seed + i) % (SEED_MAX + 1)
