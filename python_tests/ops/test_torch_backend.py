"""Torch backend vs the executable spec (vskip_kernels.reference), through the public API.

The backend has two paths: small problems run as one masked batch, larger ones by row
sets (text rows, vskip visual rows against text keys only, frozen rows skipped). Every
test here runs on both (the ``path`` fixture), since these shapes are small enough for
the batched path."""

import itertools

import pytest
import torch

from python_tests._shared import assert_matches_reference, assert_rule, make_qkv
from vskip_kernels import modality_attention, visual_attention_mass
from vskip_kernels.ops.pytorch import attention as torch_attention
from vskip_kernels.reference import allowed_mask, attention_ref, visual_mass_ref

POLICIES = ("dense", "vskip", "frozen")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 80, 96, 128)
GQA = (1, 2, 4)


@pytest.fixture(autouse=True, params=("batched", "rowsets"))
def path(request, monkeypatch):
    """Which path of the torch backend runs: rowsets forces the row-set path at every size."""
    if request.param == "rowsets":
        monkeypatch.setattr(torch_attention, "_SMALL_BUDGET", 0)
    return request.param


def test_small_problems_take_the_batched_path(path, monkeypatch):
    """The fixture really switches paths (else every test above would test one path twice)."""
    calls = []
    monkeypatch.setattr(torch_attention, "_forward_small", lambda *a: calls.append(1) or (None, None, None))
    vis, _, n = layout("interleaved")
    q, k, v = make_qkv(1, 2, 2, n, n, 64, torch.float32)
    try:
        modality_attention(q, k, v, vis, policy="vskip", backend="torch")
    except Exception:
        pass  # the stub returns no output; only whether it was called matters
    assert bool(calls) == (path == "batched")


def spans(*parts):
    """is_visual [N] from ("t", n) / ("v", n) runs."""
    return torch.cat([torch.full((n,), kind == "v") for kind, n in parts])


def layout(name):
    """(is_visual [B, Nk], attention_mask or None, nq). Lengths are not multiples of any tile size."""
    psi = spans(("t", 7), ("v", 50), ("t", 13))
    inter = spans(("t", 5), ("v", 20), ("t", 6), ("v", 25), ("t", 3), ("v", 10), ("t", 4))
    if name == "prefix_image_suffix":
        return psi[None], None, psi.numel()
    if name == "interleaved":
        return inter[None], None, inter.numel()
    if name == "image_first":
        vis = spans(("v", 40), ("t", 25))
        return vis[None], None, vis.numel()
    if name == "all_visual":
        return torch.ones(1, 61, dtype=torch.bool), None, 61
    if name == "text_only":
        return torch.zeros(1, 59, dtype=torch.bool), None, 59
    if name == "left_padding":
        vis = torch.stack([psi, torch.cat([torch.zeros(15, dtype=torch.bool), psi[:-15]])])
        mask = torch.ones(2, psi.numel(), dtype=torch.int64)
        mask[1, :15] = 0
        return vis, mask, psi.numel()
    if name == "chunked":
        return inter[None], None, 30
    if name == "decode":
        return psi[None], None, 1
    raise KeyError(name)


LAYOUTS = (
    "prefix_image_suffix",
    "interleaved",
    "image_first",
    "all_visual",
    "text_only",
    "left_padding",
    "chunked",
    "decode",
)


def check_against_reference(q, k, v, vis, mask, policy, visual_self):
    kw = dict(policy=policy, attention_mask=mask, visual_self=visual_self)
    out, mass, lse = modality_attention(q, k, v, vis, return_visual_mass=True, return_lse=True, backend="torch", **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert mass.dtype == lse.dtype == torch.float32 and mass.shape == lse.shape == q.shape[:3]
    assert not out.isnan().any() and not mass.isnan().any() and not lse.isnan().any()
    assert_matches_reference(
        (out, mass, lse), q, k, v, vis, mask, policy, visual_self, out_atol=1e-6 if q.dtype == torch.float32 else 1e-5
    )
    # rows with no allowed key: exact zeros and -inf, never NaN
    empty = ~allowed_mask(vis, mask, q.shape[2], policy, visual_self).any(-1)[:, None].expand(mass.shape)
    assert (out[empty] == 0).all() and (mass[empty] == 0).all() and (lse[empty] == float("-inf")).all()
    return out, mass, lse


def _layout_grid():
    """(policy, dtype, head dim, GQA ratio, layout): head dim and GQA ratio rotate over the
    cases; test_head_dims_gqa covers their full product."""
    cases = []
    for policy, dtype, name in itertools.product(POLICIES, DTYPES, LAYOUTS):
        idx = LAYOUTS.index(name) + DTYPES.index(dtype)
        cases.append((policy, dtype, HEAD_DIMS[idx % 4], GQA[idx % 3], name))
    return cases


@pytest.mark.parametrize("visual_self", (True, False))
@pytest.mark.parametrize("policy,dtype,d,gqa,layout_name", _layout_grid())
def test_layouts(policy, dtype, d, gqa, layout_name, visual_self):
    vis, mask, nq = layout(layout_name)
    idx = LAYOUTS.index(layout_name) + DTYPES.index(dtype)
    q, k, v = make_qkv(vis.shape[0], 2 * gqa, 2, nq, vis.shape[1], d, dtype, seed=idx)
    check_against_reference(q, k, v, vis, mask, policy, visual_self)


@pytest.mark.parametrize("gqa", GQA)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("policy", POLICIES)
def test_head_dims_gqa(policy, head_dim, gqa):
    vis, mask, nq = layout("left_padding")
    q, k, v = make_qkv(2, 2 * gqa, 2, 40, vis.shape[1], head_dim, torch.bfloat16, seed=head_dim + gqa)
    check_against_reference(q, k, v, vis, mask, policy, True)


@pytest.mark.parametrize("policy", POLICIES)
def test_fp32_matches_fp32_reference_tightly(policy):
    vis, mask, nq = layout("left_padding")
    q, k, v = make_qkv(2, 4, 2, nq, vis.shape[1], 64, torch.float32)
    out, mass, lse = modality_attention(
        q, k, v, vis, policy=policy, attention_mask=mask, return_visual_mass=True, return_lse=True, backend="torch"
    )
    r_out, r_mass, r_lse = attention_ref(q, k, v, vis, policy=policy, attention_mask=mask)
    torch.testing.assert_close(out, r_out, atol=2e-6, rtol=0)
    torch.testing.assert_close(mass, r_mass, atol=2e-6, rtol=0)
    torch.testing.assert_close(lse, r_lse, atol=4e-6, rtol=0)


def test_long_sequence_crosses_chunks():
    # several key chunks and query chunks, a gap between text runs, padding and GQA
    vis = spans(("t", 300), ("v", 900), ("t", 150), ("v", 200), ("t", 60))[None].repeat(2, 1)
    mask = torch.ones_like(vis, dtype=torch.int32)
    mask[1, :333] = 0
    for policy in POLICIES:
        q, k, v = make_qkv(2, 4, 1, vis.shape[1] - 100, vis.shape[1], 64, torch.float32, seed=3)
        check_against_reference(q, k, v, vis, mask, policy, True)


@pytest.mark.parametrize("visual_self", (True, False))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("policy", POLICIES)
def test_visual_mass(policy, dtype, visual_self):
    vis, mask, _ = layout("left_padding")
    q, k, _ = make_qkv(2, 4, 2, 50, vis.shape[1], 80, dtype, seed=5)
    kw = dict(policy=policy, attention_mask=mask, visual_self=visual_self)
    got = visual_attention_mass(q, k, vis, backend="torch", **kw)
    ref = visual_mass_ref(q, k, vis, **kw)
    ref_lp = attention_ref(q, k, k, vis, upcast=False, **kw)[1]
    assert got.dtype == torch.float32 and got.shape == (2, 4, 50)
    assert ((got >= 0) & (got <= 1)).all()
    assert_rule("visual_mass", got, ref, ref_lp)
    # selected queries, unsorted, repeated and negative: the same values as the full computation
    pos = [-1, 3, 0, 3, 17]
    sel = visual_attention_mass(q, k, vis, backend="torch", query_positions=pos, **kw)
    torch.testing.assert_close(sel, got[:, :, torch.tensor(pos)], atol=1e-6, rtol=0)


def test_vskip_visual_rows_never_touch_visual_keys():
    # real savings (row sets) or exact masking (batched): 0 * NaN in P @ V must not poison visual rows
    vis, _, n = layout("interleaved")
    q, k, v = make_qkv(1, 2, 2, n, n, 64, torch.float32)
    kp, vp = k.clone(), v.clone()
    kp[:, :, vis[0]] = float("nan")
    vp[:, :, vis[0]] = float("nan")
    clean = modality_attention(q, k, v, vis, policy="vskip", visual_self=False, backend="torch")
    poisoned = modality_attention(q, kp, vp, vis, policy="vskip", visual_self=False, backend="torch")
    rows = vis[0]
    assert torch.equal(poisoned[:, :, rows], clean[:, :, rows])


def test_frozen_visual_rows_are_never_computed():
    vis, _, n = layout("prefix_image_suffix")
    q, k, v = make_qkv(1, 2, 2, n, n, 64, torch.float32)
    q[:, :, vis[0]] = float("nan")
    out, mass, lse = modality_attention(
        q, k, v, vis, policy="frozen", return_visual_mass=True, return_lse=True, backend="torch"
    )
    assert (out[:, :, vis[0]] == 0).all() and (mass[:, :, vis[0]] == 0).all()
    assert (lse[:, :, vis[0]] == float("-inf")).all()
    assert torch.isfinite(out[:, :, ~vis[0]]).all()


def test_non_contiguous_inputs():
    vis, mask, nq = layout("left_padding")
    q, k, v = make_qkv(2, 4, 2, nq, vis.shape[1], 64, torch.float32)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, H, D] storage, as transformers produces
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    vt = v.transpose(1, 2).contiguous().transpose(1, 2)
    a = modality_attention(q, k, v, vis, attention_mask=mask, backend="torch")
    b = modality_attention(qt, kt, vt, vis, attention_mask=mask, backend="torch")
    assert torch.equal(a, b)
