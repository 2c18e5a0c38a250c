"""Triton prefill attention (ops/triton_attention.py) against reference.attention_ref.

Runs in Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1), so shapes
are small and the schedules use 16/32 tiles to span many tiles. Every axis of the
flash-attn style grid (policy, dtype, head dim, GQA group, layout, visual_self) is
covered; the layout x policy grid rotates the other axes instead of taking their
full product, to stay within the CPU budget.
"""
from __future__ import annotations

import pytest
import torch

from vskip_kernels import modality_attention, plan_schedule
from vskip_kernels.ops import triton_attention as ta
from vskip_kernels.reference import allowed_mask, attention_ref, live_tile_pairs

DTYPES = (torch.float16, torch.bfloat16)
# Tiny absolute slack on top of 2x the low-precision reference's error (the common tolerance rule).
ATOL = 1e-5


def _spans(n, spans):
    vis = torch.zeros(n, dtype=torch.bool)
    for a, b in spans:
        vis[a:b] = True
    return vis


def make_layout(name):
    """(is_visual [B, Nk], attention_mask [B, Nk] | None, nq)."""
    if name == "prefix_img_suffix":
        return _spans(96, [(16, 72)])[None], None, 96
    if name == "two_images":
        return _spans(112, [(8, 40), (52, 90)])[None], None, 112
    if name == "image_first":
        return _spans(80, [(0, 48)])[None], None, 80
    if name == "all_visual":
        return torch.ones(1, 64, dtype=torch.bool), None, 64
    if name == "text_only":
        return torch.zeros(1, 72, dtype=torch.bool), None, 72
    if name == "left_pad":
        vis = torch.stack([_spans(96, [(30, 70)]), _spans(96, [(6, 38), (50, 81)])])
        am = torch.ones(2, 96, dtype=torch.int64)
        am[0, :20] = 0
        return vis, am, 96
    if name == "chunked":  # Nq < Nk: the last 40 of 128 positions, straddling an image's end
        vis = torch.stack([_spans(128, [(20, 100)]), _spans(128, [(0, 30), (95, 110)])])
        am = torch.ones(2, 128, dtype=torch.int64)
        am[1, :9] = 0
        return vis, am, 40
    raise KeyError(name)


LAYOUTS = ("prefix_img_suffix", "two_images", "image_first", "all_visual", "text_only", "left_pad", "chunked")
GROUPS = {1: (2, 2), 2: (2, 1), 4: (4, 1)}  # group -> (Hq, Hkv)
BLOCKS = ((16, 32), (32, 16), (32, 32))


def make_qkv(b, hq, hkv, nq, nk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    return q, k, v


def _err(a, b):
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def check_against_ref(q, k, v, vis, am, policy, visual_self, block=None, want_mass=True, want_lse=True):
    nq = q.shape[2]
    sched = None
    if block is not None:
        sched = plan_schedule(vis, am, nq=nq, policy=policy, visual_self=visual_self, block_m=block[0],
                              block_n=block[1])
    res = modality_attention(q, k, v, vis, policy=policy, attention_mask=am, visual_self=visual_self,
                             return_visual_mass=want_mass, return_lse=want_lse, schedule=sched, backend="triton")
    out, rest = res[0], list(res[1:])
    mass = rest.pop(0) if want_mass else None
    lse = rest.pop(0) if want_lse else None
    kw = dict(policy=policy, attention_mask=am, visual_self=visual_self)
    o32, m32, l32 = attention_ref(q, k, v, vis, **kw)
    olp, mlp, llp = attention_ref(q, k, v, vis, upcast=False, **kw)

    assert out.dtype == q.dtype and out.shape == q.shape
    assert not torch.isnan(out).any()
    assert _err(out, o32) <= 2 * _err(olp, o32) + ATOL, (_err(out, o32), _err(olp, o32))
    empty = ~allowed_mask(vis, am, nq, policy, visual_self).any(-1)  # [B, Nq]
    empty = empty[:, None, :].expand(-1, q.shape[1], -1)
    assert (out[empty] == 0).all()
    if want_mass:
        assert mass.dtype == torch.float32 and mass.shape == q.shape[:3]
        assert not torch.isnan(mass).any() and (mass[empty] == 0).all()
        assert _err(mass, m32) <= 2 * _err(mlp, m32) + ATOL, (_err(mass, m32), _err(mlp, m32))
    if want_lse:
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
        assert not torch.isnan(lse).any()
        assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all()
        fin = ~empty
        assert _err(lse[fin], l32[fin]) <= 2 * _err(llp[fin], l32[fin]) + ATOL, (
            _err(lse[fin], l32[fin]), _err(llp[fin], l32[fin]))
    return out


def _case(policy, layout, d, dtype, group, visual_self, block, seed=0):
    vis, am, nq = make_layout(layout)
    hq, hkv = GROUPS[group]
    q, k, v = make_qkv(vis.shape[0], hq, hkv, nq, vis.shape[1], d, dtype, seed)
    return check_against_ref(q, k, v, vis, am, policy, visual_self, block)


# --------------------------------------------------------------------------- main grid

_GRID = []
for _i, (_pol, _lay) in enumerate((p, lay) for p in ("dense", "vskip", "frozen") for lay in LAYOUTS):
    _GRID.append(pytest.param(
        _pol, _lay, (64, 80, 128)[_i % 3], DTYPES[_i % 2], (1, 2, 4)[(_i // 2) % 3],
        _pol != "vskip" or _i % 2 == 0, BLOCKS[_i % 3],
        id=f"{_pol}-{_lay}-{_i}",
    ))


@pytest.mark.parametrize("policy,layout,d,dtype,group,visual_self,block", _GRID)
def test_policy_layout_grid(policy, layout, d, dtype, group, visual_self, block):
    _case(policy, layout, d, dtype, group, visual_self, block)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", (64, 80, 128))
def test_dtype_head_dim(dtype, d):
    _case("vskip", "two_images", d, dtype, 2, True, (32, 32), seed=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("d,policy", [(96, "vskip"), (256, "frozen")])
def test_head_dim_96_256(d, policy, dtype):
    _case(policy, "prefix_img_suffix", d, dtype, 2, True, (32, 32), seed=2)


@pytest.mark.parametrize("group", (1, 2, 4))
def test_gqa_groups(group):
    _case("vskip", "left_pad", 64, torch.float16, group, True, (32, 16), seed=3)


@pytest.mark.parametrize("visual_self", (True, False))
@pytest.mark.parametrize("layout", ("image_first", "chunked"))
def test_visual_self(layout, visual_self):
    _case("vskip", layout, 64, torch.bfloat16, 2, visual_self, (16, 32), seed=4)


@pytest.mark.parametrize("policy", ("vskip", "frozen"))
def test_default_block_sizes(policy):
    # No schedule: modality_attention plans one with ta.block_sizes(q).
    _case(policy, "left_pad", 128, torch.float16, 2, True, None, seed=5)


def test_float32_inputs_exact():
    vis, am, nq = make_layout("two_images")
    q, k, v = make_qkv(1, 2, 1, nq, vis.shape[1], 64, torch.float32, seed=6)
    check_against_ref(q, k, v, vis, am, "vskip", True, (32, 32))


def test_strided_inputs():
    """transformers keeps q/k/v as [B, N, H, D] transposed to [B, H, N, D]: strides, no copies."""
    vis, am, nq = make_layout("left_pad")
    b, n = vis.shape
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(b, n, 4 + 2 * 2, 64, generator=g).to(torch.bfloat16)
    q, k, v = (qkv[:, :, :4].transpose(1, 2), qkv[:, :, 4:6].transpose(1, 2), qkv[:, :, 6:].transpose(1, 2))
    assert not q.is_contiguous()
    check_against_ref(q, k, v, vis, am, "vskip", True, (32, 32))


@pytest.mark.parametrize("want_mass,want_lse", [(True, False), (False, True)])
def test_single_statistic(want_mass, want_lse):
    vis, am, nq = make_layout("chunked")
    q, k, v = make_qkv(2, 2, 1, nq, vis.shape[1], 64, torch.float16, seed=8)
    check_against_ref(q, k, v, vis, am, "vskip", True, (16, 32), want_mass=want_mass, want_lse=want_lse)


def test_no_statistics_direct():
    vis, am, nq = make_layout("image_first")
    q, k, v = make_qkv(1, 2, 2, nq, vis.shape[1], 64, torch.float16, seed=9)
    sched = plan_schedule(vis, am, nq=nq, policy="frozen", block_m=32, block_n=32)
    out, mass, lse = ta.attention_forward(q, k, v, sched, 0.125, False, False)
    assert mass is None and lse is None
    ref, _, _ = attention_ref(q, k, v, vis, policy="frozen", softmax_scale=0.125)
    ref_lp, _, _ = attention_ref(q, k, v, vis, policy="frozen", softmax_scale=0.125, upcast=False)
    assert _err(out, ref) <= 2 * _err(ref_lp, ref) + ATOL


# --------------------------------------------------------------------------- block sparsity


@pytest.mark.parametrize("policy,visual_self,layout,block", [
    ("dense", True, "left_pad", (32, 16)),
    ("vskip", True, "two_images", (16, 32)),
    ("vskip", False, "chunked", (16, 16)),
    ("frozen", True, "left_pad", (16, 32)),
])
def test_tile_count_matches_live_pairs(policy, visual_self, layout, block):
    vis, am, nq = make_layout(layout)
    b, nk = vis.shape
    q, k, v = make_qkv(b, 2, 1, nq, nk, 64, torch.float16, seed=10)
    sched = plan_schedule(vis, am, nq=nq, policy=policy, visual_self=visual_self, block_m=block[0], block_n=block[1])
    with ta.count_tiles() as counter:
        assert ta.active_counter() is counter.tensor
        modality_attention(q, k, v, vis, policy=policy, attention_mask=am, visual_self=visual_self,
                           return_lse=True, schedule=sched, backend="triton")
    assert ta.active_counter() is None
    live = live_tile_pairs(allowed_mask(vis, am, nq, policy, visual_self), *block)
    assert counter.value == 2 * int(live.sum())
    dense_pairs = b * 2 * -(-nq // block[0]) * -(-nk // block[1])
    if policy != "dense":
        assert counter.value < dense_pairs


def test_empty_rows_exact_zero():
    # vskip without visual_self: the image at position 0 has no earlier text key; plus
    # padded queries and frozen visual rows in the second sequence.
    vis = torch.stack([_spans(64, [(0, 40)]), _spans(64, [(10, 50)])])
    am = torch.ones(2, 64, dtype=torch.int64)
    am[1, :10] = 0
    q, k, v = make_qkv(2, 2, 2, 64, 64, 64, torch.bfloat16, seed=11)
    for policy, visual_self in (("vskip", False), ("frozen", True)):
        sched = plan_schedule(vis, am, policy=policy, visual_self=visual_self, block_m=16, block_n=16)
        out, mass, lse = ta.attention_forward(q, k, v, sched, 0.125, True, True)
        empty = ~allowed_mask(vis, am, 64, policy, visual_self).any(-1)[:, None, :].expand(-1, 2, -1)
        assert empty.any()
        assert not (torch.isnan(out).any() or torch.isnan(mass).any() or torch.isnan(lse).any())
        assert (out[empty] == 0).all() and (mass[empty] == 0).all()
        assert (lse[empty] == float("-inf")).all() and torch.isfinite(lse[~empty]).all()


# --------------------------------------------------------------------------- sizes and errors


def test_block_sizes_by_target():
    assert ta._default_blocks(90, "fp16", 128) == (128, 64)
    assert ta._default_blocks(80, "bf16", 64) == (128, 64)
    assert ta._default_blocks(86, "fp16", 128) == (64, 64)
    assert ta._default_blocks(89, "bf16", 256) == (64, 32)
    q = torch.zeros(1, 1, 4, 64, dtype=torch.float16)
    bm, bn = ta.block_sizes(q)
    assert bm in (16, 32, 64, 128) and bn in (16, 32, 64, 128)


def test_unsupported_combinations_raise():
    vis, am, nq = make_layout("text_only")
    q, k, v = make_qkv(1, 1, 1, nq, vis.shape[1], 64, torch.float16)
    big = plan_schedule(vis, am, policy="dense", block_m=256, block_n=64)
    with pytest.raises(ValueError, match="block_m"):
        ta.attention_forward(q, k, v, big, 0.125, False, False)
    q32, k32, v32 = make_qkv(1, 1, 1, nq, vis.shape[1], 256, torch.float32)
    huge = plan_schedule(vis, am, policy="dense", block_m=128, block_n=128)
    with pytest.raises(ValueError, match="shared memory"):
        ta.attention_forward(q32, k32, v32, huge, 0.0625, False, False)
    with pytest.raises(ValueError, match="head dims"):
        ta.block_sizes(torch.zeros(1, 1, 4, 512, dtype=torch.float16))
    with pytest.raises(ValueError, match="float16"):
        ta.block_sizes(torch.zeros(1, 1, 4, 64, dtype=torch.float64))
    wrong = plan_schedule(vis[:, :64], None, policy="dense", block_m=32, block_n=32)
    with pytest.raises(ValueError, match="schedule"):
        ta.attention_forward(q, k, v, wrong, 0.125, False, False)


# --------------------------------------------------------------------------- real GPU


@pytest.mark.cuda
class TestCuda:
    @pytest.mark.parametrize("policy", ("dense", "vskip", "frozen"))
    @pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 128), (torch.float16, 80), (torch.float16, 256)])
    def test_against_reference(self, policy, dtype, d):
        torch.manual_seed(0)
        b, hq, hkv, n = 2, 8, 2, 1000
        vis = torch.zeros(b, n, dtype=torch.bool)
        vis[0, 40:620] = True
        vis[1, 100:400] = True
        vis[1, 500:900] = True
        am = torch.ones(b, n, dtype=torch.int64)
        am[1, :37] = 0
        q, k, v = (t.cuda() for t in make_qkv(b, hq, hkv, n, n, d, dtype))
        check_against_ref(q, k, v, vis.cuda(), am.cuda(), policy, True)

    def test_chunked_and_tile_count(self):
        vis, am, nq = make_layout("chunked")
        vis, am = vis.cuda(), am.cuda()
        q, k, v = (t.cuda() for t in make_qkv(2, 4, 2, nq, vis.shape[1], 128, torch.float16))
        check_against_ref(q, k, v, vis, am, "vskip", False, (16, 32))
        sched = plan_schedule(vis, am, nq=nq, policy="vskip", block_m=32, block_n=32)
        with ta.count_tiles() as counter:
            ta.attention_forward(q, k, v, sched, 0.1, True, True)
        live = live_tile_pairs(allowed_mask(vis, am, nq, "vskip", True), 32, 32)
        assert counter.value == 4 * int(live.sum())
