"""Triton prefill attention (ops/triton/attention.py) against reference.attention_ref.

Runs in Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1), so shapes
are small and the schedules use 16/32 tiles to span many tiles. Every axis of the
flash-attn style grid (policy, dtype, head dim, GQA group, layout, visual_self) is
covered; the layout x policy grid rotates the other axes instead of taking their
full product, to stay within the CPU budget.
"""

from __future__ import annotations

import pytest
import torch

from python_tests._shared import assert_matches_reference, assert_rule, build_layout, make_qkv
from vskip_kernels import modality_attention, plan_schedule
from vskip_kernels.ops.triton import attention as ta
from vskip_kernels.reference import allowed_mask, attention_ref, live_tile_pairs

DTYPES = (torch.float16, torch.bfloat16)

# name -> (Nk, visual ranges per sequence, left padding per sequence | None, nq)
_LAYOUTS = {
    "prefix_img_suffix": (96, [[(16, 72)]], None, 96),
    "two_images": (112, [[(8, 40), (52, 90)]], None, 112),
    "image_first": (80, [[(0, 48)]], None, 80),
    "all_visual": (64, [[(0, 64)]], None, 64),
    "text_only": (72, [[]], None, 72),
    "left_pad": (96, [[(30, 70)], [(6, 38), (50, 81)]], (20, 0), 96),
    # Nq < Nk: the last 40 of 128 positions, straddling an image's end
    "chunked": (128, [[(20, 100)], [(0, 30), (95, 110)]], (0, 9), 40),
}


def make_layout(name):
    """(is_visual [B, Nk], attention_mask [B, Nk] | None, nq)."""
    n, seqs, pad, nq = _LAYOUTS[name]
    return (*build_layout(n, *seqs, pad=pad), nq)


LAYOUTS = tuple(_LAYOUTS)
GROUPS = {1: (2, 2), 2: (2, 1), 4: (4, 1)}  # group -> (Hq, Hkv)
BLOCKS = ((16, 32), (32, 16), (32, 32))


def check_against_ref(q, k, v, vis, am, policy, visual_self, block=None, want_mass=True, want_lse=True):
    nq = q.shape[2]
    sched = None
    if block is not None:
        sched = plan_schedule(
            vis, am, nq=nq, policy=policy, visual_self=visual_self, block_m=block[0], block_n=block[1]
        )
    res = modality_attention(
        q,
        k,
        v,
        vis,
        policy=policy,
        attention_mask=am,
        visual_self=visual_self,
        return_visual_mass=want_mass,
        return_lse=want_lse,
        schedule=sched,
        backend="triton",
    )
    out, rest = res[0], list(res[1:])
    mass = rest.pop(0) if want_mass else None
    lse = rest.pop(0) if want_lse else None

    assert out.dtype == q.dtype and out.shape == q.shape
    assert_matches_reference((out, mass, lse), q, k, v, vis, am, policy, visual_self)
    empty = ~allowed_mask(vis, am, nq, policy, visual_self).any(-1)  # [B, Nq]
    empty = empty[:, None, :].expand(-1, q.shape[1], -1)
    assert (out[empty] == 0).all()
    if want_mass:
        assert mass.dtype == torch.float32 and mass.shape == q.shape[:3]
        assert (mass[empty] == 0).all()
    if want_lse:
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
        assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all()
    return out


def _case(policy, layout, d, dtype, group, visual_self, block, seed=0):
    vis, am, nq = make_layout(layout)
    hq, hkv = GROUPS[group]
    q, k, v = make_qkv(vis.shape[0], hq, hkv, nq, vis.shape[1], d, dtype, seed)
    return check_against_ref(q, k, v, vis, am, policy, visual_self, block)


# --------------------------------------------------------------------------- main grid

_GRID = []
for _i, (_pol, _lay) in enumerate((p, lay) for p in ("dense", "vskip", "frozen") for lay in LAYOUTS):
    _GRID.append(
        (
            _pol,
            _lay,
            DTYPES[_i % 2],
            (64, 80, 128)[_i % 3],
            (1, 2, 4)[(_i // 2) % 3],
            _pol != "vskip" or _i % 2 == 0,
            BLOCKS[_i % 3],
        )
    )


@pytest.mark.parametrize("policy,layout,dtype,d,group,visual_self,block", _GRID)
def test_policy_layout_grid(policy, layout, dtype, d, group, visual_self, block):
    _case(policy, layout, d, dtype, group, visual_self, block)


@pytest.mark.parametrize("d", (64, 80, 128))
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_head_dim(dtype, d):
    _case("vskip", "two_images", d, dtype, 2, True, (32, 32), seed=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("policy,d", [("vskip", 96), ("frozen", 256)])
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


@pytest.mark.parametrize("want_mass,want_lse", [(True, False), (False, True)], ids=["mass", "lse"])
def test_single_statistic(want_mass, want_lse):
    vis, am, nq = make_layout("chunked")
    q, k, v = make_qkv(2, 2, 1, nq, vis.shape[1], 64, torch.float16, seed=8)
    check_against_ref(q, k, v, vis, am, "vskip", True, (16, 32), want_mass=want_mass, want_lse=want_lse)


def test_no_statistics_direct():
    vis, am, nq = make_layout("image_first")
    q, k, v = make_qkv(1, 2, 2, nq, vis.shape[1], 64, torch.float16, seed=9)
    sched = plan_schedule(vis, am, nq=nq, policy="frozen", block_m=32, block_n=32)
    out, mass, lse = ta.prefill_forward(q, k, v, sched, 0.125, False, False)
    assert mass is None and lse is None
    ref, _, _ = attention_ref(q, k, v, vis, policy="frozen", softmax_scale=0.125)
    ref_lp, _, _ = attention_ref(q, k, v, vis, policy="frozen", softmax_scale=0.125, upcast=False)
    assert_rule("out", out, ref, ref_lp)


# --------------------------------------------------------------------------- block sparsity


@pytest.mark.parametrize(
    "policy,visual_self,layout,block",
    [
        ("dense", True, "left_pad", (32, 16)),
        ("vskip", True, "two_images", (16, 32)),
        ("vskip", False, "chunked", (16, 16)),
        ("frozen", True, "left_pad", (16, 32)),
    ],
)
def test_tile_count_matches_live_pairs(policy, visual_self, layout, block):
    vis, am, nq = make_layout(layout)
    b, nk = vis.shape
    q, k, v = make_qkv(b, 2, 1, nq, nk, 64, torch.float16, seed=10)
    sched = plan_schedule(vis, am, nq=nq, policy=policy, visual_self=visual_self, block_m=block[0], block_n=block[1])
    with ta.count_tiles() as counter:
        assert ta.active_counter() is counter.tensor
        modality_attention(
            q,
            k,
            v,
            vis,
            policy=policy,
            attention_mask=am,
            visual_self=visual_self,
            return_lse=True,
            schedule=sched,
            backend="triton",
        )
    assert ta.active_counter() is None
    live = live_tile_pairs(allowed_mask(vis, am, nq, policy, visual_self), *block)
    assert counter.value == 2 * int(live.sum())
    dense_pairs = b * 2 * -(-nq // block[0]) * -(-nk // block[1])
    if policy != "dense":
        assert counter.value < dense_pairs


def test_empty_rows_exact_zero():
    # vskip without visual_self: the image at position 0 has no earlier text key; plus
    # padded queries and frozen visual rows in the second sequence.
    vis, am = build_layout(64, [(0, 40)], [(10, 50)], pad=(0, 10))
    q, k, v = make_qkv(2, 2, 2, 64, 64, 64, torch.bfloat16, seed=11)
    for policy, visual_self in (("vskip", False), ("frozen", True)):
        sched = plan_schedule(vis, am, policy=policy, visual_self=visual_self, block_m=16, block_n=16)
        out, mass, lse = ta.prefill_forward(q, k, v, sched, 0.125, True, True)
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
    assert {ta._default_blocks(cc, "fp32", d) for cc in ta.TARGETS for d in ta.HEAD_DIMS} == {(16, 16)}
    q = torch.zeros(1, 1, 4, 64, dtype=torch.float16)
    bm, bn = ta.block_sizes(q)
    assert bm in (16, 32, 64, 128) and bn in (16, 32, 64, 128)


def test_configs_fit_shared_memory_and_registers():
    """configs_for keeps what fits both: 4 warps only for 64x64 tiles at D=64; 128-row tiles
    and head dims above 64 take 8 warps (with 4 they spill: REG_BUDGET's measurements)."""
    assert ta.configs_for(80, "fp16", 128, 128, 64) == [(8, 2), (8, 3), (8, 4)]
    assert ta.configs_for(90, "bf16", 64, 128, 64) == [(8, 2), (8, 3), (8, 4)]
    assert ta.configs_for(86, "fp16", 64, 64, 64) == list(ta.TUNE_CONFIGS)
    for d in (80, 96, 128):
        assert ta.configs_for(89, "bf16", d, 64, 64) == [(8, 2)]  # only two stages fit 99 KiB
    assert ta.configs_for(86, "fp16", 256, 64, 32) == [(8, 2)]
    assert ta.configs_for(80, "fp16", 256, 64, 64) == [(8, 2)]
    for cc in ta.TARGETS:
        for dtype in ("fp16", "bf16", "fp32"):
            for d in ta.HEAD_DIMS:
                bm, bn = ta._default_blocks(cc, dtype, d)
                fits = ta.configs_for(cc, dtype, d, bm, bn)
                assert fits and all(ta.reg_estimate(bm, bn, d, dtype, w) <= ta.REG_BUDGET for w, _ in fits)
                assert all(ta.smem_estimate(cc, bm, bn, d, dtype, s) <= ta.SMEM_LIMITS[cc] for _, s in fits)


def test_registry_lists_exactly_the_launchable_configs():
    """aot_specs registers each (tile, config, head dim, dtype) on exactly the targets whose
    default tile and configs_for pick it: nothing launchable escapes the compile gate."""
    registered = {(s.name, cc) for s in ta.aot_specs() for cc in s.targets}
    launchable = set()
    for cc in ta.TARGETS:
        for dtype in ("fp16", "bf16", "fp32"):
            for d in ta.HEAD_DIMS:
                bm, bn = ta._default_blocks(cc, dtype, d)
                for w, s in ta.configs_for(cc, dtype, d, bm, bn):
                    launchable.add((f"attn_{dtype}_d{d}_m{bm}n{bn}_w{w}s{s}", cc))
    assert registered == launchable


def test_unsupported_combinations_raise():
    vis, am, nq = make_layout("text_only")
    q, k, v = make_qkv(1, 1, 1, nq, vis.shape[1], 64, torch.float16)
    big = plan_schedule(vis, am, policy="dense", block_m=256, block_n=64)
    with pytest.raises(ValueError, match="block_m"):
        ta.prefill_forward(q, k, v, big, 0.125, False, False)
    q32, k32, v32 = make_qkv(1, 1, 1, nq, vis.shape[1], 256, torch.float32)
    huge = plan_schedule(vis, am, policy="dense", block_m=128, block_n=128)
    with pytest.raises(ValueError, match="shared memory"):
        ta.prefill_forward(q32, k32, v32, huge, 0.0625, False, False)
    # fits shared memory, but not the registers of any warp count (it would spill)
    q16, k16, v16 = make_qkv(1, 1, 1, nq, vis.shape[1], 128, torch.float16)
    with pytest.raises(ValueError, match="registers"):
        ta.prefill_forward(q16, k16, v16, huge, 0.0884, False, False)
    with pytest.raises(ValueError, match="head dims"):
        ta.block_sizes(torch.zeros(1, 1, 4, 512, dtype=torch.float16))
    with pytest.raises(ValueError, match="float16"):
        ta.block_sizes(torch.zeros(1, 1, 4, 64, dtype=torch.float64))
    wrong = plan_schedule(vis[:, :64], None, policy="dense", block_m=32, block_n=32)
    with pytest.raises(ValueError, match="schedule"):
        ta.prefill_forward(q, k, v, wrong, 0.125, False, False)


# --------------------------------------------------------------------------- real GPU


@pytest.mark.cuda
class TestCuda:
    @pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 128), (torch.float16, 80), (torch.float16, 256)])
    @pytest.mark.parametrize("policy", ("dense", "vskip", "frozen"))
    def test_against_reference(self, policy, dtype, d):
        torch.manual_seed(0)
        b, hq, hkv, n = 2, 8, 2, 1000
        vis, am = build_layout(n, [(40, 620)], [(100, 400), (500, 900)], pad=(0, 37))
        q, k, v = (t.cuda() for t in make_qkv(b, hq, hkv, n, n, d, dtype))
        check_against_ref(q, k, v, vis.cuda(), am.cuda(), policy, True)

    def test_chunked_and_tile_count(self):
        vis, am, nq = make_layout("chunked")
        vis, am = vis.cuda(), am.cuda()
        q, k, v = (t.cuda() for t in make_qkv(2, 4, 2, nq, vis.shape[1], 128, torch.float16))
        check_against_ref(q, k, v, vis, am, "vskip", False, (16, 32))
        sched = plan_schedule(vis, am, nq=nq, policy="vskip", block_m=32, block_n=32)
        with ta.count_tiles() as counter:
            ta.prefill_forward(q, k, v, sched, 0.1, True, True)
        live = live_tile_pairs(allowed_mask(vis, am, nq, "vskip", True), 32, 32)
        assert counter.value == 4 * int(live.sum())
