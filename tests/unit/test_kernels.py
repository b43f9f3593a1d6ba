"""The sampling-step kernels (kernels/) against their torch references (model/sampling/step.py).

Without CUDA the kernels run on the CPU under triton's interpreter. ``TRITON_INTERPRET=1`` must be set
before triton itself is first imported (triton's own ``@jit`` helpers, which ``tl.max`` and friends
call, are decorated then) and stay set while kernels launch. So this module sets it before importing
anything of triton, keeps it set only while its own tests run (the ``_interpreter`` fixture) and
restores it otherwise. tests/conftest.py sets it first of all on a host without CUDA, so in a suite run
triton is imported with the interpreter on and these tests run in this process. Only where triton was
imported earlier with it off (``torch._dynamo`` imports triton, and ``vqdiff.model.io.folder`` imports
that; e.g. a run with ``TRITON_INTERPRET=0`` given) are the in-process tests skipped, and then, only then,
``test_in_a_fresh_process`` exists and runs this file again in a fresh interpreter process.

kernels/ is a leaf: ``test_kernels_import_and_run_without_model_or_server`` imports it and runs a kernel in a
process where ``vqdiff.model`` and ``vqdiff.server`` cannot be imported.

With CUDA the same tests run the compiled kernels on the GPU against the references on the GPU; the
ones marked ``gpu`` (ITHQ-sized) run only there.

Tolerances (purity and log p are computed in fp32 whatever the logit dtype; bf16 and fp16 logits
convert to fp32 exactly, so they share the fp32 tolerances): purity rtol 5e-6, atol 1e-7; log p atol
1e-5 plus rtol 1e-6 (values near -70 carry 4e-6 ulps); truncation's kept sets, chosen positions and
drawn tokens identical.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if CUDA else "cpu"
_BEFORE = os.environ.get("TRITON_INTERPRET")
# Without CUDA, the kernels can run in this process only if triton is not imported yet, or was imported
# with the interpreter on.
IN_PROCESS = CUDA or "triton" not in sys.modules or _BEFORE == "1"

if importlib.util.find_spec("triton") is None:  # find_spec, not import: the first import fixes triton's mode
    pytest.skip("triton is not installed", allow_module_level=True)


def _restore_env() -> None:
    if _BEFORE is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _BEFORE


if IN_PROCESS:
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"  # until the end of this module's body (its own kernel below)
    import triton
    import triton.language as tl

    from vqdiff import kernels
    from vqdiff.kernels import ops
    from vqdiff.kernels import rng as krng

import vqdiff.model.sampling.step as ref  # noqa: E402
from vqdiff.model.sampling import rng  # noqa: E402
from vqdiff.model.config import DiffusionConfig  # noqa: E402
from vqdiff.model.diffusion import Schedule  # noqa: E402
from vqdiff.model.sampling.step import LOG_MIN, POSTERIOR, PURITY, RANDOM, BatchParams, denoise_step  # noqa: E402

in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported before TRITON_INTERPRET=1 could be "
                                "set; test_in_a_fresh_process runs these")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

PURITY_TOL = dict(rtol=5e-6, atol=1e-7)
LOG_P_TOL = dict(rtol=1e-6, atol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    """TRITON_INTERPRET=1 while this module's tests run (triton also reads it when kernels launch)."""
    if CUDA or not IN_PROCESS:
        yield
        return
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    _restore_env()


if not IN_PROCESS:  # otherwise the very tests it would run again run here

    def test_in_a_fresh_process():
        """Triton was imported with its interpreter off before this module: run this file on its own."""
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def logits(b: int, n: int, k: int, dtype: torch.dtype, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(b, n, k, generator=g) * scale
    uncond = torch.randn(b, n, k, generator=g) * scale
    return cond.to(dtype).to(DEVICE), uncond.to(dtype).to(DEVICE)


def rows_of(values: list[float], b: int, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor([values[i % len(values)] for i in range(b)], dtype=dtype, device=DEVICE)


def assert_log_p_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    differ = (got == LOG_MIN) != (want == LOG_MIN)
    assert not differ.any(), f"kept sets differ at {differ.nonzero()[:10].tolist()}"
    torch.testing.assert_close(got, want, **LOG_P_TOL)


# ---------------------------------------------------------------------------------------------
# the switch and the sets


@in_process
def test_each_kernel_has_the_signature_of_its_reference():
    for name in ("guided_purity", "select_masked", "draw_at"):
        assert inspect.signature(getattr(ops, name)) == inspect.signature(getattr(ref, name)), name


@in_process
def test_switch(monkeypatch):
    monkeypatch.setenv("VQDIFF_KERNELS", "torch")
    assert ref.step_ops("cpu") is ref and ref.step_ops("cuda") is ref
    monkeypatch.setenv("VQDIFF_KERNELS", "auto")
    assert ref.step_ops("cpu") is ref
    assert ref.step_ops("cuda") is ops  # triton is installed here
    monkeypatch.setenv("VQDIFF_KERNELS", "triton")
    assert ref.step_ops(DEVICE) is ops
    assert kernels.usable("cuda") and kernels.usable(DEVICE)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not kernels.usable("cpu")
    with pytest.raises(ValueError, match="VQDIFF_KERNELS=triton: tensors are on cpu"):
        ref.step_ops("cpu")
    monkeypatch.setenv("VQDIFF_KERNELS", "cuda")
    with pytest.raises(ValueError, match="VQDIFF_KERNELS: 'cuda' is not allowed; expected one of auto, triton, torch"):
        ref.step_ops("cpu")


@in_process
def test_the_package_exposes_the_kernel_ops():
    for name in ("guided_purity", "select_masked", "draw_at"):
        assert getattr(kernels, name) is getattr(ops, name), name
    with pytest.raises(AttributeError):
        _ = kernels.denoise_step  # the step is the caller's, not the kernels'


def test_importing_the_step_does_not_import_triton():
    code = "import sys, vqdiff.model.sampling.step, vqdiff.model.sampling.sampler, vqdiff.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# Run in a fresh interpreter where vqdiff.model and vqdiff.server cannot be imported: every module of
# kernels/ imports, and the guided kernel (interpreted) agrees with a torch reference computed here.
LEAF = r"""
import importlib, importlib.abc, pkgutil, sys

BLOCKED = ("vqdiff.model", "vqdiff.server")


def blocked(name):
    return any(name == b or name.startswith(b + ".") for b in BLOCKED)


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if blocked(name):
            raise ImportError(f"kernels/ imported {name}")
        return None


sys.meta_path.insert(0, Refuse())
import torch

import vqdiff.kernels as kernels

for m in pkgutil.iter_modules(kernels.__path__):
    importlib.import_module("vqdiff.kernels." + m.name)
from vqdiff.kernels import constants, guided, ops

assert guided.INTERPRETED  # the kernels run on these CPU tensors under the interpreter
g = torch.Generator().manual_seed(0)
b, n, k = 2, 5, 37
cond = torch.randn(b, n, k, generator=g) * 4
uncond = torch.randn(b, n, k, generator=g) * 4
scale = torch.tensor([1.0, 3.5])
pur, log_p = ops.guided_purity(cond, uncond, scale, torch.ones(b), True, False)
want = torch.log_softmax(uncond + scale.view(-1, 1, 1) * (cond - uncond), -1).clamp(constants.LOG_MIN, 0.0)
torch.testing.assert_close(log_p, want, rtol=1e-6, atol=1e-5)
torch.testing.assert_close(pur, want.max(-1).values.exp(), rtol=5e-6, atol=1e-7)
assert not [m for m in sys.modules if blocked(m)]
print("kernels ran alone")
"""


def test_kernels_import_and_run_without_model_or_server():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", LEAF], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "kernels ran alone" in r.stdout


# ---------------------------------------------------------------------------------------------
# the hash: kernels/rng.py computes model/sampling/rng.py's bits


if IN_PROCESS:

    @triton.jit
    def _uniform_kernel(seed_ptr, step_ptr, out_ptr, NC, STREAM: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        i = tl.arange(0, BLOCK)
        h = krng.row_state(tl.load(seed_ptr + b), tl.load(step_ptr + b), STREAM)
        tl.store(out_ptr + b * NC + i, krng.uniform(h, i), mask=i < NC)


@in_process
@pytest.mark.parametrize("stream,n,c", [(rng.SELECT, 37, None), (rng.TOKEN, 5, 37), (rng.POSTERIOR, 3, 100)])
def test_hash_bits_equal_model_rng(stream, n, c):
    seed = torch.tensor([0, 1, 5, 2**32 - 1, 2**32, 2**40 + 3, 2**53 - 1, 2**63 - 1], device=DEVICE)
    step = torch.tensor([0, 1, 7, 99, 3, 2**20, 0, 12345], device=DEVICE)
    nc = n * (c or 1)
    out = torch.empty(len(seed), nc, dtype=torch.float32, device=DEVICE)
    _uniform_kernel[(len(seed),)](seed, step, out, nc, STREAM=stream, BLOCK=triton.next_power_of_2(nc))
    assert torch.equal(out, rng.uniform(seed, step, stream, n, c).reshape(len(seed), nc))


def test_uniform_at_equals_rng_uniform():
    g = torch.Generator().manual_seed(0)
    seed, step = torch.tensor([3, 2**40 + 1, 2**63 - 1]), torch.tensor([0, 5, 77])
    pos = torch.randint(0, 50, (3, 7), generator=g)
    want = rng.uniform(seed, step, rng.TOKEN, 50, 13).gather(1, pos.unsqueeze(-1).expand(3, 7, 13))
    assert torch.equal(rng.uniform_at(seed, step, rng.TOKEN, pos, 13), want)


# ---------------------------------------------------------------------------------------------
# fused guided log-probs, truncation, purity

SHAPES = [(3, 17, 37), (1, 1, 1), (2, 5, 2), (5, 9, 1000), (2, 8, 4096)]


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("b,n,k", SHAPES)
def test_guided_purity_matches_reference(b, n, k, dtype):
    for scale, seed in ((1.0, 0), (5.0, 1)):
        cond, uncond = logits(b, n, k, dtype, scale, seed)
        gs = rows_of([3.0, 1.0, 50.0, 7.5, 1.5], b)
        r = rows_of([0.9, 1.0, 0.05, 0.5, 0.999], b)
        want_p, want_lp = ref.guided_purity(cond, uncond, gs, r, True, True)
        got_p, got_lp = ops.guided_purity(cond, uncond, gs, r, True, True)
        torch.testing.assert_close(got_p, want_p, **PURITY_TOL)
        assert_log_p_equal(got_lp, want_lp)
        only_p, none = ops.guided_purity(cond, uncond, gs, r)  # the hot path: purity alone
        assert none is None and torch.equal(only_p, got_p)
        _, untruncated = ops.guided_purity(cond, uncond, gs, r, True, False)
        assert_log_p_equal(untruncated, ref.guided_log_probs(cond, uncond, gs))


@in_process
@pytest.mark.parametrize("k", [6, 300])
def test_truncation_ties_break_by_class_index(k):
    """bf16-like logits from a few values: many exact ties, boundaries inside tie groups."""
    b, n = 4, 24
    g = torch.Generator().manual_seed(k)
    cond = torch.randint(0, 4, (b, n, k), generator=g).float().mul(0.75).to(torch.bfloat16).to(DEVICE)
    gs = torch.ones(b, device=DEVICE)
    r = torch.tensor([0.3, 0.55, 0.8, 0.93], device=DEVICE)
    _, want_lp = ref.guided_purity(cond, cond, gs, r, True, True)
    _, got_lp = ops.guided_purity(cond, cond, gs, r, True, True)
    assert_log_p_equal(got_lp, want_lp)
    lp = ref.guided_log_probs(cond, cond, gs)  # (B, N, K)
    kept = want_lp > LOG_MIN
    tied = lp.unsqueeze(-1) == lp.unsqueeze(-2)  # (B, N, K, K)
    split = (tied & (kept.unsqueeze(-1) != kept.unsqueeze(-2))).flatten(2).any(-1)  # (B, N): a tie group cut by r
    assert int(split.sum()) > 5, "test design: boundaries must fall inside tie groups"
    for bb, nn in split.nonzero().tolist():  # within a tie group, the kept classes are the lowest indices
        for v in lp[bb, nn].unique():
            group = kept[bb, nn][lp[bb, nn] == v]
            assert torch.equal(group, torch.sort(group, descending=True, stable=True).values)


@in_process
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
def test_non_finite_logits_give_nan_purity_for_that_position_only():
    """The engine fails a request on a non-finite purity: NaN/+inf logits, or all -inf, must show there."""
    cond, uncond = logits(2, 6, 37, torch.float32, 3.0, 4)
    cond[0, 1, 5] = float("nan")
    cond[1, 2, 0] = float("inf")
    cond[1, 4, :] = float("-inf")
    uncond[1, 4, :] = float("-inf")
    gs, r = rows_of([3.0], 2), rows_of([0.9], 2)
    want_p, want_lp = ref.guided_purity(cond, uncond, gs, r, True, True)
    got_p, got_lp = ops.guided_purity(cond, uncond, gs, r, True, True)
    bad = torch.zeros(2, 6, dtype=torch.bool, device=DEVICE)
    bad[0, 1] = bad[1, 2] = bad[1, 4] = True
    assert torch.equal(got_p.isnan(), bad) and torch.equal(want_p.isnan(), bad)
    torch.testing.assert_close(got_p[~bad], want_p[~bad], **PURITY_TOL)
    assert_log_p_equal(got_lp[~bad], want_lp[~bad])  # the other positions are untouched
    _, untruncated = ops.guided_purity(cond, uncond, gs, r, True, False)
    assert untruncated[bad].isnan().all()


# ---------------------------------------------------------------------------------------------
# top-Δz selection


def selection_case(b: int, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Rows: all masked; none masked (count 3); count above the masked number; count 0; uniform
    weights (the random sampler); score with exact ties; the rest random."""
    g = torch.Generator().manual_seed(seed)
    score = torch.rand(b, n, generator=g) + 1e-3
    masked = torch.rand(b, n, generator=g) < 0.6
    count = torch.randint(0, n + 1, (b,), generator=g)
    patterns = [
        (torch.ones(n, dtype=torch.bool), max(1, n // 3), None),
        (torch.zeros(n, dtype=torch.bool), 3, None),
        (torch.rand(n, generator=g) < 0.5, n, None),
        (torch.ones(n, dtype=torch.bool), 0, None),
        (torch.rand(n, generator=g) < 0.8, max(1, n // 4), torch.ones(n)),
        (torch.ones(n, dtype=torch.bool), max(1, n // 2), (torch.rand(n, generator=g) * 4).ceil() / 4),
    ]
    for i, (m, c, s) in enumerate(patterns[:b]):
        masked[i], count[i] = m, c
        if s is not None:
            score[i] = s
    seeds = torch.randint(0, 2**62, (b,), generator=g)
    seeds[0] = 2**63 - 1
    steps = torch.randint(0, 200, (b,), generator=g)
    return tuple(t.to(DEVICE) for t in (score, masked, count, seeds, steps))


@in_process
@pytest.mark.parametrize("b,n", [(7, 17), (6, 64), (3, 1024), (1, 1)])
def test_select_masked_matches_reference(b, n):
    for seed in range(3):
        score, masked, count, seeds, steps = selection_case(b, n, seed)
        want = ref.select_masked(score, masked, count, seeds, steps)
        got = ops.select_masked(score, masked, count, seeds, steps)
        assert torch.equal(got, want), (got != want).nonzero()
        assert torch.equal(got.sum(-1), torch.minimum(count, masked.sum(-1)))
        assert not (got & ~masked).any()


# ---------------------------------------------------------------------------------------------
# token draw at the chosen positions


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
# The grid is (B, M) programs, M up to N (row 0 draws everywhere), each over all K classes: under the
# interpreter B * N * K sets the cost, so K = 1000 comes with N = 9 (as in SHAPES); 17 positions
# (one past a power of two) are the first shape's.
@pytest.mark.parametrize("b,n,k", [(3, 17, 37), (5, 9, 1000), (2, 8, 4096), (1, 1, 1)])
def test_draw_at_matches_reference(b, n, k, dtype):
    cond, uncond = logits(b, n, k, dtype, 4.0, 7)
    g = torch.Generator().manual_seed(8)
    chosen = torch.rand(b, n, generator=g) < 0.4
    chosen[0] = True  # a row drawing everywhere
    if b > 1:
        chosen[1] = False  # and one drawing nowhere
    chosen = chosen.to(DEVICE)
    x = torch.randint(0, k + 1, (b, n), generator=g).to(DEVICE)
    sharpen = (1.0 + 2.0 * torch.rand(b, n, generator=g)).to(DEVICE)
    gs, r = rows_of([3.0, 1.0, 7.5], b), rows_of([0.9, 1.0, 0.3, 0.99], b)
    seed, step = rows_of([2**63 - 1, 3, 2**40 + 7], b, torch.int64), rows_of([5, 0, 99], b, torch.int64)
    max_count = int(chosen.sum(-1).max())
    want = ref.draw_at(cond, uncond, gs, r, sharpen, chosen, x, seed, step, max_count, True)
    assert torch.equal(want, ref.draw_at(cond, uncond, gs, r, sharpen, chosen, x, seed, step))  # any M
    got = ops.draw_at(cond, uncond, gs, r, sharpen, chosen, x, seed, step, max_count, True)
    assert torch.equal(got, want), (got != want).nonzero()
    assert torch.equal(got[~chosen], x[~chosen])
    for m in (1, 0):  # a bound below the rows' counts: the first m chosen positions of each row only
        want_m = ref.draw_at(cond, uncond, gs, r, sharpen, chosen, x, seed, step, m, True)
        assert torch.equal(ops.draw_at(cond, uncond, gs, r, sharpen, chosen, x, seed, step, m, True), want_m)


def test_draw_at_equals_drawing_everywhere():
    """The reference's fast path (M candidate positions) gives the bits of the full (B, N, K) draw."""
    b, n, k = 4, 40, 37
    cond, uncond = logits(b, n, k, torch.float32, 3.0, 9)
    g = torch.Generator().manual_seed(10)
    chosen = (torch.rand(b, n, generator=g) < 0.2).to(DEVICE)
    x = torch.full((b, n), k, device=DEVICE)
    sharpen = (1.0 + torch.rand(b, n, generator=g)).to(DEVICE)
    gs, r = rows_of([2.0, 5.0], b), rows_of([0.8, 1.0], b)
    seed, step = rows_of([11, 2**50], b, torch.int64), rows_of([4, 9], b, torch.int64)
    log_p = ref.truncate(ref.guided_log_probs(cond, uncond, gs), r)
    everywhere = ref.draw_tokens(log_p, sharpen, rng.uniform(seed, step, rng.TOKEN, n, k))
    want = torch.where(chosen, everywhere, x)
    got = ref.draw_at(cond, uncond, gs, r, sharpen, chosen, x, seed, step, int(chosen.sum(-1).max()), True)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# launchers check what they are given


@in_process
def test_launchers_reject_bad_inputs():
    cond, uncond = logits(2, 3, 5, torch.float32, 1.0, 0)
    g1, r1 = rows_of([1.0], 2), rows_of([1.0], 2)
    with pytest.raises(ValueError, match=r"uncond must have shape \(2, 3, 5\), got \(2, 3, 4\)"):
        ops.guided_purity(cond, uncond[..., :4].contiguous(), g1, r1)
    with pytest.raises(ValueError, match="uncond must be torch.float32, got torch.bfloat16"):
        ops.guided_purity(cond, uncond.bfloat16(), g1, r1)
    with pytest.raises(ValueError, match="cond must be torch.float32 or torch.bfloat16 or torch.float16, got torch.float64"):
        ops.guided_purity(cond.double(), uncond.double(), g1, r1)
    with pytest.raises(ValueError, match="cond must be contiguous"):
        ops.guided_purity(cond.transpose(1, 2).contiguous().transpose(1, 2), uncond, g1, r1)
    with pytest.raises(ValueError, match=r"guidance_scale must have shape \(2,\), got \(3,\)"):
        ops.guided_purity(cond, uncond, rows_of([1.0], 3), r1)
    with pytest.raises(ValueError, match=r"cond must be \(B, N, K\) logits"):
        ops.guided_purity(cond[0], uncond[0], g1, r1)
    score, masked, count, seed, step = selection_case(2, 3, 0)
    with pytest.raises(ValueError, match="masked must be torch.bool"):
        ops.select_masked(score, masked.long(), count, seed, step)
    with pytest.raises(ValueError, match="count must be torch.int64, got torch.int32"):
        ops.select_masked(score, masked, count.int(), seed, step)
    x = torch.zeros(2, 3, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=r"sharpen must have shape \(2, 3\)"):
        ops.draw_at(cond, uncond, g1, r1, score[:, :2].contiguous(), masked, x, seed, step)
    with pytest.raises(ValueError, match="K = 20000 classes is more than"):
        big = torch.zeros(1, 1, 20000, device=DEVICE)
        ops.guided_purity(big, big, rows_of([1.0], 1), rows_of([1.0], 1))


# ---------------------------------------------------------------------------------------------
# the step and the sampler: the same tokens with kernels and with references


def step_case(b: int, n: int, k: int, dtype: torch.dtype):
    cond, uncond = logits(b, n, k, dtype, 3.0, 12)
    g = torch.Generator().manual_seed(13)
    x = torch.full((b, n), k)
    x[0, : n // 2] = torch.randint(0, k, (n // 2,), generator=g)
    kinds = [PURITY, RANDOM, POSTERIOR, PURITY, PURITY]
    rows = [dict(guidance_scale=[3.0, 1.0, 5.0, 7.5, 2.0][i % 5], truncation_rate=[0.9, 1.0, 0.86, 1.0, 0.5][i % 5],
                 purity_weight=[1.0, 0.0, 0.0, 2.0, 0.5][i % 5], kind=kinds[i % 5], seed=2**40 + i, step=i,
                 count=[5, 9, 0, n, 0][i % 5], t_eval=[0, 0, 50, 0, 0][i % 5]) for i in range(b)]
    return cond, uncond, x.to(DEVICE), BatchParams.build(rows, DEVICE), Schedule(DiffusionConfig(num_classes=k), DEVICE)


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b,n,k", [(5, 24, 37), (3, 16, 1000)])
def test_denoise_step_same_with_kernels_and_references(monkeypatch, b, n, k, dtype):
    cond, uncond, x, p, sched = step_case(b, n, k, dtype)
    monkeypatch.setenv("VQDIFF_KERNELS", "torch")
    want = denoise_step(cond, uncond, x, p, sched)
    monkeypatch.setenv("VQDIFF_KERNELS", "triton")
    got = denoise_step(cond, uncond, x, p, sched)
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.purity, want.purity, **PURITY_TOL)
    assert_log_p_equal(got.log_p, want.log_p)


@pytest.fixture(scope="module")
def tiny_model(tokenizer, tiny_config):
    from vqdiff.model.io.folder import random_model

    m = random_model(tiny_config, tokenizer, seed=3).eval()
    with torch.no_grad():  # confident, varied predictions (as tests/unit/test_sampler.py)
        m.transformer.out.weight.mul_(40.0)
        m.null_cond.embeddings.normal_()
    return m.to(DEVICE)


@in_process
def test_sampler_same_tokens_with_kernels_and_references(tiny_model, monkeypatch):
    from vqdiff.model.sampling.params import GenerationParams
    from vqdiff.model.sampling.sampler import sample

    prompts = ["a red circle", "blue square above a green triangle", "a circle", "the square"]
    params = [
        GenerationParams(sampler="purity", steps=8, seed=11, guidance_scale=3.0, truncation_rate=0.9, purity_weight=1.5),
        GenerationParams(sampler="random", steps=5, seed=2**50, guidance_scale=5.0, truncation_rate=1.0),
        GenerationParams(sampler="skip", steps=6, seed=7, guidance_scale=2.0, truncation_rate=0.86),
        GenerationParams(sampler="purity", steps=16, seed=3, guidance_scale=1.0, truncation_rate=1.0),
    ]
    monkeypatch.setenv("VQDIFF_KERNELS", "torch")
    want = sample(tiny_model, prompts, params)
    monkeypatch.setenv("VQDIFF_KERNELS", "triton")
    got = sample(tiny_model, prompts, params)
    assert torch.equal(got.tokens, want.tokens)
    assert (got.tokens < tiny_model.config.transformer.num_embed).all()


# ---------------------------------------------------------------------------------------------
# ITHQ-sized, on the GPU only


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ithq_shapes_on_gpu(dtype):
    b, n, k = 4, 1024, 4096
    cond, uncond = logits(b, n, k, dtype, 3.0, 21)
    gs, r = rows_of([5.0, 1.0, 3.0, 7.5], b), rows_of([0.86, 1.0, 0.5, 0.99], b)
    want_p, want_lp = ref.guided_purity(cond, uncond, gs, r, True, True)
    got_p, got_lp = ops.guided_purity(cond, uncond, gs, r, True, True)
    torch.testing.assert_close(got_p, want_p, **PURITY_TOL)
    # Kept sets: a class whose mass before it is within fp32 rounding of r may fall either way (the
    # softmax denominators differ in their last bits); allow two such classes in 4096 positions.
    differ = (got_lp == LOG_MIN) != (want_lp == LOG_MIN)
    assert int(differ.sum()) <= 2, f"{int(differ.sum())} kept-set differences"
    torch.testing.assert_close(got_lp[~differ], want_lp[~differ], **LOG_P_TOL)
    score = want_p / want_p.max(-1, keepdim=True).values
    masked = torch.rand(b, n, device=DEVICE) < 0.7
    count, seed, step = rows_of([10, 0, 1024, 37], b, torch.int64), rows_of([1, 2**63 - 1, 5, 9], b, torch.int64), \
        rows_of([0, 3, 50, 99], b, torch.int64)
    chosen = ops.select_masked(score, masked, count, seed, step)
    assert torch.equal(chosen, ref.select_masked(score, masked, count, seed, step))
    x = torch.full((b, n), k, device=DEVICE)
    sharpen = 1.0 + score
    want = ref.draw_at(cond, uncond, gs, r, sharpen, chosen, x, seed, step, int(chosen.sum(-1).max()), True)
    got = ops.draw_at(cond, uncond, gs, r, sharpen, chosen, x, seed, step, None, True)
    assert torch.equal(got, want), f"{int((got != want).sum())} of {int(chosen.sum())} draws differ"


@gpu
@needs_cuda
def test_step_with_kernels_does_not_sync_the_host(monkeypatch):
    b, n, k = 8, 1024, 4096
    cond, uncond = logits(b, n, k, torch.bfloat16, 3.0, 22)
    x = torch.full((b, n), k, device=DEVICE)
    rows = [dict(guidance_scale=5.0, truncation_rate=[1.0, 0.86][i % 2], purity_weight=1.0, kind=[PURITY, RANDOM][i % 2],
                 seed=i, step=i, count=10, t_eval=0) for i in range(b)]
    p, sched = BatchParams.build(rows, DEVICE), Schedule(DiffusionConfig(num_classes=k))
    monkeypatch.setenv("VQDIFF_KERNELS", "triton")
    denoise_step(cond, uncond, x, p, sched)  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = denoise_step(cond, uncond, x, p, sched)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    monkeypatch.setenv("VQDIFF_KERNELS", "torch")
    assert torch.equal(got.tokens, denoise_step(cond, uncond, x, p, sched).tokens)


_restore_env()  # other test modules never see TRITON_INTERPRET=1 (the fixture sets it for these tests)
