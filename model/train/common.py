"""What every ``vqdiff train`` run shares: the batch order, atomic checkpoints, the JSON-lines log.

Runs are resumable and exact: a batch, a timestep, a noise draw at step s depend only on
(seed, s), and a checkpoint holds everything else, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch


def warmup_cosine(step: int, warmup: int, steps: int, floor: float | None) -> float:
    """Learning-rate factor at ``step``: linear warmup over ``warmup`` steps, then constant
    (``floor`` None) or a cosine from 1 down to ``floor`` at ``steps``."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    if floor is None or step < warmup:
        return warm
    done = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * done))


PROBE_STEPS = 50  # steps timed before a time-budgeted run fixes its length


def budgeted_steps(budget_s: float, max_steps: int, step: int, elapsed_s: float, s_per_step: float) -> int:
    """The step a run with a time budget ends at: as many steps as the budget's remaining seconds
    allow at the measured pace (a 5% margin for checkpoints), never more than ``max_steps`` and never
    fewer than ``step``. The learning-rate schedule then decays to its floor at that step."""
    left = budget_s - elapsed_s
    return max(step, min(max_steps, step + int(0.95 * left / s_per_step)))


class TimeBudget:
    """``--time-budget-s``: a run times ``probe`` steps, then fixes its length so that its cosine
    tail ends in time (``plan``); the budget is a hard stop too (``over``: the pace can drop after
    the plan when other work shares the device). Seconds count from ``t_start``, before loading."""

    def __init__(self, budget_s: float | None, t_start: float, start_step: int, probe: int = PROBE_STEPS):
        self.budget_s, self.t_start, self.start, self.probe = budget_s, t_start, start_step, probe
        self.t_half = t_start  # when the probe's timed second half began

    def plan(self, step: int, max_steps: int, now: float) -> int | None:
        """Called after each step: the run's new length at the end of the probe, else None. The
        first steps carry start-up costs, so the pace is that of the probe's second half."""
        if self.budget_s is None:
            return None
        if step == self.start + self.probe // 2:
            self.t_half = now
        if step != self.start + self.probe:
            return None
        return budgeted_steps(self.budget_s, max_steps, step, now - self.t_start, (now - self.t_half) / (self.probe // 2))

    def over(self, now: float) -> bool:
        return self.budget_s is not None and now - self.t_start > self.budget_s


def batch_indices(n: int, batch: int, seed: int, step: int) -> torch.Tensor:
    """Indices of the batch at ``step``: a fresh permutation every epoch, a pure function of (seed, step)."""
    per_epoch = max(1, n // batch)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[k * batch : (k + 1) * batch]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random source of one training step (timesteps, noise, caption drops, code restarts)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a torn checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def save_progress(state: dict, path: Path) -> None:
    """A run's position as JSON, written atomically beside its checkpoint: with OUT/model/ it is the
    weights-only state a run resumes from when checkpoint.pt (weights, optimizer moments: several
    times the model's size) was not kept, e.g. carried to another machine."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state) + "\n")
    os.replace(tmp, path)


def load_progress(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


class JsonLog:
    """Appends one JSON object per line to OUT/train.log."""

    def __init__(self, path: Path):
        self.f = open(path, "a")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()
