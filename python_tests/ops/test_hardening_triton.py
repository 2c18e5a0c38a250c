"""Hardening: the Triton kernels (interpreter on CPU) on random layouts, against the reference.

Hypothesis draws any number of visual spans (touching the start or the end), left padding,
batches of mixed layouts, Nq <= Nk, GQA ratios 1/2/4/7, head dims 64/80/96/128 and lengths that
are multiples of no tile size, for every policy. Each kernel is checked with the tolerance rule
(error vs the fp32 reference <= 2x the low-precision reference's + a tiny atol) and its
``count_tiles()`` total against ``reference.live_tile_pairs``. derandomize=True keeps CI
reproducible; shapes are small because the interpreter runs every program in Python.
"""

from __future__ import annotations

from unittest import mock

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vskip_kernels import modality_attention, plan_schedule, visual_attention_mass
from vskip_kernels.ops.triton import attention as ta
from vskip_kernels.ops.triton import decode as td
from vskip_kernels.ops.triton import visual_mass as tvm
from vskip_kernels.reference import allowed_mask, attention_ref, live_tile_pairs, token_kind, visual_mass_ref

POLICIES = ("dense", "vskip", "frozen")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (64, 80, 96, 128)
GQA = (1, 2, 4, 7)
BUDGET = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def layouts(draw, min_len=1, max_len=70):
    """(is_visual [B, Nk], attention_mask [B, Nk]); each sequence its own layout."""
    bsz = draw(st.integers(1, 3))
    nk = draw(st.integers(min_len, max_len))
    vis = torch.zeros(bsz, nk, dtype=torch.bool)
    mask = torch.ones(bsz, nk, dtype=torch.int32)
    for b in range(bsz):
        if draw(st.booleans()):
            mask[b, : draw(st.integers(0, nk))] = 0  # left padding, possibly the whole row
        for _ in range(draw(st.integers(0, 4))):
            where = draw(st.sampled_from(("start", "end", "inside")))
            length = draw(st.integers(1, nk))
            start = {"start": 0, "end": max(0, nk - length), "inside": draw(st.integers(0, nk - 1))}[where]
            vis[b, start : start + length] = True
    return vis, mask


@st.composite
def problems(draw, nq_range, max_len=70):
    vis, mask = draw(layouts(min_len=nq_range[0], max_len=max_len))
    nk = vis.shape[1]
    nq = draw(st.integers(nq_range[0], min(nq_range[1], nk)))
    return dict(
        vis=vis,
        mask=mask,
        nq=nq,
        policy=draw(st.sampled_from(POLICIES)),
        visual_self=draw(st.booleans()),
        group=draw(st.sampled_from(GQA)),
        hkv=draw(st.integers(1, 2)),
        d=draw(st.sampled_from(HEAD_DIMS)),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**16)),
    )


def make_qkv(p):
    g = torch.Generator().manual_seed(p["seed"])
    bsz, nk = p["vis"].shape
    hq = p["hkv"] * p["group"]
    q = torch.randn(bsz, hq, p["nq"], p["d"], generator=g).to(p["dtype"])
    k = torch.randn(bsz, p["hkv"], nk, p["d"], generator=g).to(p["dtype"])
    v = torch.randn(bsz, p["hkv"], nk, p["d"], generator=g).to(p["dtype"])
    return q, k, v


def assert_rule(name, got, ref32, ref_lp):
    got, ref32, ref_lp = got.float(), ref32.float(), ref_lp.float()
    assert got.shape == ref32.shape, (name, got.shape, ref32.shape)
    assert not got.isnan().any(), f"{name} has NaN"
    fin = torch.isfinite(ref32)
    assert torch.equal(torch.isfinite(got), fin) and torch.equal(got[~fin], ref32[~fin]), name
    if fin.any():
        err = (got - ref32)[fin].abs().max().item()
        lim = 2 * (ref_lp - ref32)[fin].abs().max().item() + 1e-5
        assert err <= lim, f"{name}: max error {err:.3g} > {lim:.3g}"


def check_attention(p, q, k, v, got):
    kw = dict(policy=p["policy"], attention_mask=p["mask"], visual_self=p["visual_self"])
    ref32 = attention_ref(q, k, v, p["vis"], upcast=True, **kw)
    ref_lp = attention_ref(q, k, v, p["vis"], upcast=False, **kw)
    assert got[0].dtype == q.dtype
    for name, a, r, rl in zip(("out", "visual_mass", "lse"), got, ref32, ref_lp):
        assert_rule(name, a, r, rl)


def live_pairs(p, block_m, block_n):
    allowed = allowed_mask(p["vis"], p["mask"], p["nq"], p["policy"], p["visual_self"])
    return int(live_tile_pairs(allowed, block_m, block_n).sum())


def run_triton(p, q, k, v, sched):
    """(out, visual_mass, lse) from the triton backend for problem ``p`` on schedule ``sched``."""
    return modality_attention(
        q,
        k,
        v,
        p["vis"],
        policy=p["policy"],
        attention_mask=p["mask"],
        visual_self=p["visual_self"],
        return_visual_mass=True,
        return_lse=True,
        schedule=sched,
        backend="triton",
    )


@BUDGET
@given(p=problems((1, 70)), block_m=st.sampled_from((16, 32, 64)), block_n=st.sampled_from((16, 32, 64)))
def test_prefill_kernel_random_layouts(p, block_m, block_n):
    q, k, v = make_qkv(p)
    sched = plan_schedule(
        p["vis"],
        p["mask"],
        nq=p["nq"],
        policy=p["policy"],
        visual_self=p["visual_self"],
        block_m=block_m,
        block_n=block_n,
    )
    # Small Nq would take the decode path; force the prefill kernel so it sees every Nq too.
    with mock.patch.object(td, "use_decode_path", lambda q, k: False), ta.count_tiles() as counter:
        got = run_triton(p, q, k, v, sched)
    check_attention(p, q, k, v, got)
    assert counter.value == q.shape[1] * live_pairs(p, block_m, block_n)


@BUDGET
@given(p=problems((1, 4), max_len=90), block_m=st.sampled_from((16, 32, 64)), block_n=st.sampled_from((16, 32, 64)))
def test_decode_kernel_random_layouts(p, block_m, block_n):
    q, k, v = make_qkv(p)
    sched = plan_schedule(
        p["vis"],
        p["mask"],
        nq=p["nq"],
        policy=p["policy"],
        visual_self=p["visual_self"],
        block_m=block_m,
        block_n=block_n,
    )
    assert td.use_decode_path(q, k)
    with ta.count_tiles() as counter:
        got = run_triton(p, q, k, v, sched)
    check_attention(p, q, k, v, got)
    # Nq <= 4 < block_m: one query tile, so each live key tile serves every query head once.
    assert counter.value == q.shape[1] * live_pairs(p, block_m, block_n)


@BUDGET
@given(p=problems((1, 70)), data=st.data())
def test_visual_mass_kernel_random_query_positions(p, data):
    nq = p["nq"]
    sel = data.draw(st.lists(st.integers(-nq, nq - 1), min_size=1, max_size=5))
    q, k, _ = make_qkv(p)
    kw = dict(policy=p["policy"], attention_mask=p["mask"], visual_self=p["visual_self"])
    with ta.count_tiles() as counter:
        got = visual_attention_mass(q, k, p["vis"], query_positions=sel, backend="triton", **kw)
    idx = [s % nq for s in sel]
    ref32 = visual_mass_ref(q, k, p["vis"], query_positions=sel, **kw)
    ref_lp = attention_ref(q, k, torch.zeros_like(k), p["vis"], upcast=False, **kw)[1][:, :, idx]
    assert_rule("visual_mass", got, ref32, ref_lp)
    assert ((got >= 0) & (got <= 1)).all()
    group = p["group"]
    block_m, block_n = tvm.tile_plan(token_kind(p["vis"], p["mask"]), torch.tensor(idx), group, q.dtype, p["d"])
    rows = allowed_mask(p["vis"], p["mask"], nq, p["policy"], p["visual_self"])[:, idx]
    rows = rows.repeat_interleave(group, dim=1)  # kernel row r = (selected query r // group, head r % group)
    assert counter.value == p["hkv"] * int(live_tile_pairs(rows, block_m, block_n).sum())


# --------------------------------------------------------------------------- determinism


def _fixed_problem(nq, seed=5):
    vis = torch.zeros(2, 45, dtype=torch.bool)
    vis[0, 0:20] = True
    vis[1, 30:45] = True
    mask = torch.ones(2, 45, dtype=torch.int32)
    mask[1, :7] = 0
    return dict(
        vis=vis,
        mask=mask,
        nq=nq,
        policy="vskip",
        visual_self=True,
        group=2,
        hkv=2,
        d=80,
        dtype=torch.float16,
        seed=seed,
    )


def bits(t):
    """The raw bits of t: equal bits is bitwise equality, NaN payloads included."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def test_triton_bitwise_deterministic():
    """Prefill, decode (several splits merged) and visual mass repeat bit for bit."""
    for nq in (45, 3):
        p = _fixed_problem(nq)
        q, k, v = make_qkv(p)
        runs = [
            modality_attention(
                q, k, v, p["vis"], attention_mask=p["mask"], return_visual_mass=True, return_lse=True, backend="triton"
            )
            for _ in range(2)
        ]
        for a, b in zip(*runs):
            assert torch.equal(bits(a), bits(b))
    p = _fixed_problem(45)
    q, k, _ = make_qkv(p)
    runs = [
        visual_attention_mass(q, k, p["vis"], attention_mask=p["mask"], query_positions=[-1, 0, 17], backend="triton")
        for _ in range(2)
    ]
    assert torch.equal(bits(runs[0]), bits(runs[1]))
