"""Property tests on random layouts: torch backend vs the reference, schedule vs the mask,
non-finite inputs and determinism.

Non-finite inputs (documented in ops/pytorch/attention.py): NaN in q poisons only that query row;
NaN in k at key j poisons exactly the rows allowed to attend j (masked scores become -inf before
they can spread); NaN in v at key j poisons at least the rows attending j.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from python_tests._shared import assert_rule, make_qkv
from vskip_kernels import modality_attention, plan_schedule
from vskip_kernels.reference import allowed_mask, attention_ref, live_tile_pairs

POLICIES = ("dense", "vskip", "frozen")


@st.composite
def layouts(draw, max_len=80):
    """(is_visual [B, Nk], attention_mask [B, Nk], nq): any number of visual spans, spans touching the
    start or end, left padding, mixed layouts in one batch."""
    bsz = draw(st.integers(1, 3))
    nk = draw(st.integers(1, max_len))
    nq = draw(st.integers(1, nk))
    vis, mask = torch.zeros(bsz, nk, dtype=torch.bool), torch.ones(bsz, nk, dtype=torch.int32)
    for b in range(bsz):
        pad = draw(st.integers(0, nk - 1)) if draw(st.booleans()) else 0
        mask[b, :pad] = 0
        for _ in range(draw(st.integers(0, 4))):
            start = draw(st.integers(0, nk - 1))
            vis[b, start : start + draw(st.integers(1, nk))] = True
    return vis, mask, nq


@settings(max_examples=60, deadline=None)
@given(
    layout=layouts(),
    policy=st.sampled_from(POLICIES),
    visual_self=st.booleans(),
    gqa=st.sampled_from((1, 2, 4, 7)),
    hkv=st.integers(1, 2),
    head_dim=st.sampled_from((64, 80, 96, 128)),
    dtype=st.sampled_from((torch.float32, torch.float16, torch.bfloat16)),
    seed=st.integers(0, 2**16),
)
def test_torch_backend_matches_reference(layout, policy, visual_self, gqa, hkv, head_dim, dtype, seed):
    vis, mask, nq = layout
    bsz, nk = vis.shape
    q, k, v = make_qkv(bsz, hkv * gqa, hkv, nq, nk, head_dim, dtype, seed)
    kw = dict(policy=policy, attention_mask=mask, visual_self=visual_self)
    got = modality_attention(q, k, v, vis, return_visual_mass=True, return_lse=True, backend="torch", **kw)
    ref32 = attention_ref(q, k, v, vis, upcast=True, **kw)
    ref_lp = attention_ref(q, k, v, vis, upcast=False, **kw)
    for name, a, r, rl in zip(("out", "visual_mass", "lse"), got, ref32, ref_lp):
        assert_rule(name, a, r, rl, atol=1e-6 if (name == "out" and dtype == torch.float32) else 1e-5)


@settings(max_examples=60, deadline=None)
@given(
    layout=layouts(max_len=200),
    policy=st.sampled_from(POLICIES),
    visual_self=st.booleans(),
    block_m=st.sampled_from((16, 32, 64, 128)),
    block_n=st.sampled_from((16, 32, 64, 128)),
)
def test_schedule_live_tiles_match_mask(layout, policy, visual_self, block_m, block_n):
    vis, mask, nq = layout
    s = plan_schedule(
        vis, mask, nq=nq, policy=policy, visual_self=visual_self, block_m=block_m, block_n=block_n, backend="torch"
    )
    allowed = allowed_mask(vis, mask, nq, policy, visual_self)
    live = live_tile_pairs(allowed, block_m, block_n)
    assert torch.equal(s.live_mask(), live)
    # every entry of a full tile is allowed (so kernels may skip masking there)
    b, mt, nt = live.shape
    padded = torch.zeros(b, mt * block_m, nt * block_n, dtype=torch.bool)
    padded[:, :nq, : vis.shape[1]] = allowed
    all_allowed = padded.view(b, mt, block_m, nt, block_n).all(4).all(2)
    assert not (s.full_mask() & ~all_allowed).any()


def _case(policy="vskip"):
    g = torch.Generator().manual_seed(0)
    vis = torch.zeros(2, 40, dtype=torch.bool)
    vis[:, 5:25] = True
    mask = torch.ones(2, 40, dtype=torch.int32)
    mask[1, :3] = 0
    q = torch.randn(2, 4, 40, 64, generator=g)
    k = torch.randn(2, 2, 40, 64, generator=g)
    v = torch.randn(2, 2, 40, 64, generator=g)
    run = lambda q, k, v: modality_attention(
        q, k, v, vis, policy=policy, attention_mask=mask, return_lse=True, backend="torch"
    )
    return q, k, v, vis, mask, run


def test_nan_in_q_poisons_only_its_row():
    q, k, v, vis, mask, run = _case()
    clean_out, clean_lse = run(q, k, v)
    q[0, 1, 30, 7] = float("nan")
    out, lse = run(q, k, v)
    bad = torch.zeros_like(lse, dtype=torch.bool)
    bad[0, 1, 30] = True
    assert out[bad].isnan().all() and lse[bad].isnan().all()
    assert torch.equal(out[~bad], clean_out[~bad]) and torch.equal(lse[~bad], clean_lse[~bad])


def test_non_finite_k_poisons_exactly_the_rows_attending_it():
    for policy in POLICIES:
        for value in (float("nan"), float("inf")):
            q, k, v, vis, mask, run = _case(policy)
            clean_out, _ = run(q, k, v)
            j = 12  # a visual key: text rows attend it, vskip / frozen visual rows do not
            k[:, 0, j, :] = value
            out, lse = run(q, k, v)
            attends = allowed_mask(vis, mask, 40, policy)[:, :, j]  # [B, Nq]
            bad = torch.zeros(lse.shape, dtype=torch.bool)
            bad[:, :2] = attends[:, None]  # kv head 0 serves query heads 0 and 1
            assert (~torch.isfinite(out[bad])).all(), policy
            assert torch.equal(out[~bad], clean_out[~bad]), policy


def test_nan_in_v_poisons_the_rows_attending_it():
    q, k, v, vis, mask, run = _case("dense")
    v[:, 1, 20, 3] = float("nan")
    out, _ = run(q, k, v)
    attends = allowed_mask(vis, mask, 40, "dense")[:, :, 20]
    assert out[:, 2:, :, 3].transpose(1, 2)[attends].isnan().all()
    assert not out[:, :2].isnan().any()  # other kv head's query heads are untouched


def test_deterministic_bitwise():
    q, k, v, vis, mask, run = _case()
    a, b = run(q, k, v), run(q, k, v)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
