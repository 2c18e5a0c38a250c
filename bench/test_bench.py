"""pytest-benchmark view of the same cases: ``pytest bench --benchmark-only``.

Real model shapes and the triton backend on a GPU; the smoke shapes and the torch
backend on CPU (the triton kernels only run in Triton's interpreter there). These
report timings, they assert none. The JSON suites (``vskip bench``, vskip_kernels/bench/)
are the source of the README numbers; this file is for quick comparisons with pytest-benchmark's
tooling (--benchmark-compare, --benchmark-histogram).
"""

import pytest
import torch

import vskip_kernels as vk
from vskip_kernels.bench import baselines, cases

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16
OURS = "triton" if CUDA else "torch"
SHAPES = cases.ATTENTION_SHAPES[:3] if CUDA else cases.SMOKE_ATTENTION_SHAPES
MASS = cases.MASS_SHAPES[1] if CUDA else cases.SMOKE_MASS_SHAPES[0]
DECODE_LENS = cases.DECODE_CACHE_LENS[:2] if CUDA else cases.SMOKE_DECODE_CACHE_LENS


def _sync(fn):
    if not CUDA:
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _setup(shape, nq=None):
    is_visual = cases.is_visual_for(shape.segments, DEVICE)
    q, k, v = cases.qkv(shape, DEVICE, DTYPE, nq=nq)
    return q, k, v, is_visual


def _decode_setup(n):
    """One new query against a cache of ``n`` positions, heads as in the decode suite."""
    shape = cases.AttnShape(
        f"decode-n{n}", "decode", *((28, 4, 128) if CUDA else (4, 2, 16)), cases.one_image(n - cases.SYS - cases.PROMPT)
    )
    return _setup(shape, nq=1)


@pytest.mark.parametrize("policy", ["dense", "vskip", "frozen"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_ours_attention(benchmark, shape, policy):
    q, k, v, is_visual = _setup(shape)
    sched = None
    if OURS == "triton":
        from vskip_kernels.ops.attention import default_block_sizes

        bm, bn = default_block_sizes(q, "triton")
        sched = vk.plan_schedule(is_visual, policy=policy, block_m=bm, block_n=bn)
    benchmark.group = f"attention {shape.name} {policy}"
    benchmark(_sync(lambda: vk.modality_attention(q, k, v, is_visual, policy=policy, schedule=sched, backend=OURS)))


@pytest.mark.parametrize("policy", ["dense", "vskip", "frozen"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_sdpa_attention(benchmark, shape, policy):
    q, k, v, is_visual = _setup(shape)
    mask = None if policy == "dense" else baselines.bool_mask(is_visual, q.shape[2], policy)
    benchmark.group = f"attention {shape.name} {policy}"
    benchmark(_sync(baselines.sdpa(q, k, v, mask)))


@pytest.mark.parametrize("last_only", [False, True], ids=["all-queries", "last-token"])
def test_ours_visual_mass(benchmark, last_only):
    q, k, _, is_visual = _setup(MASS)
    pos = [-1] if last_only else None
    benchmark.group = f"visual mass {MASS.name}"
    benchmark(_sync(lambda: vk.visual_attention_mass(q, k, is_visual, query_positions=pos, backend=OURS)))


@pytest.mark.parametrize("n", DECODE_LENS)
def test_ours_decode(benchmark, n):
    q, k, v, is_visual = _decode_setup(n)
    benchmark.group = f"decode n={n}"
    benchmark(_sync(lambda: vk.modality_attention(q, k, v, is_visual, policy="dense", backend=OURS)))


@pytest.mark.parametrize("n", DECODE_LENS)
def test_sdpa_decode(benchmark, n):
    q, k, v, _ = _decode_setup(n)
    benchmark.group = f"decode n={n}"
    benchmark(_sync(baselines.sdpa(q, k, v)))
