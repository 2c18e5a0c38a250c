"""Visual attention mass (FlashVLM's A_v): public ``visual_attention_mass`` on the
triton (interpreter on CPU) and torch backends, against an eager softmax computed
here and reference.visual_mass_ref.

Small shapes keep the interpreter within budget; the policy x layout grid rotates
dtype, head dim and GQA group instead of taking their full product.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from python_tests._shared import ATOL, assert_rule, build_layout, make_qkv
from vskip_kernels import modality_attention, visual_attention_mass
from vskip_kernels.ops.triton import attention as ta
from vskip_kernels.ops.triton import visual_mass as tvm
from vskip_kernels.reference import allowed_mask, live_tile_pairs, token_kind, visual_mass_ref

POLICIES = ("dense", "vskip", "frozen")
BACKENDS = ("triton", "torch")
DTYPES = (torch.float16, torch.bfloat16)
GROUPS = ((2, 2), (4, 1), (7, 1))  # (Hq, Hkv): GQA ratios 1, 4, 7

# name -> (Nk, visual ranges per sequence, left padding per sequence | None)
_LAYOUTS = {
    "image_then_text": (96, [[(8, 60)]], None),
    "interleaved": (112, [[(4, 30), (41, 70), (80, 100)]], None),
    "left_pad": (96, [[(30, 70)], [(0, 40), (60, 90)]], (21, 0)),
    "all_visual": (64, [[(0, 64)]], None),
    # the newest (visual) token against a cache of many key blocks
    "long_cache": (420, [[(10, 300), (330, 420)]], None),
}


def make_layout(name):
    """(is_visual [B, Nk], attention_mask [B, Nk] | None)."""
    n, seqs, pad = _LAYOUTS[name]
    return build_layout(n, *seqs, pad=pad)


LAYOUTS = ("image_then_text", "interleaved", "left_pad", "all_visual")


def make_qk(b, hq, hkv, nq, nk, d, dtype, seed=0):
    return make_qkv(b, hq, hkv, nq, nk, d, dtype, seed)[:2]


def eager_mass(q, k, vis, am, policy, visual_self, scale, dtype):
    """softmax(Q K^T * scale + causal/policy mask) summed over the visual columns, in ``dtype``."""
    group = q.shape[1] // k.shape[1]
    qd, kd = q.to(dtype), k.repeat_interleave(group, dim=1).to(dtype)
    allowed = allowed_mask(vis, am, q.shape[2], policy, visual_self)[:, None]
    scores = (qd @ kd.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    probs = torch.where(allowed, torch.softmax(scores, dim=-1), torch.zeros((), dtype=dtype))
    return (probs * vis[:, None, None, :].to(dtype)).sum(-1).float()


def _grid():
    cases = []
    for i, (layout, policy) in enumerate(itertools.product(LAYOUTS, POLICIES)):
        d = 80 if i == 4 else (64, 128)[(i // 2) % 2]
        dtype, heads = DTYPES[i % 2], GROUPS[i % 3]
        for backend in BACKENDS:
            cases.append((backend, layout, policy, dtype, d, heads))
    return cases


@pytest.mark.parametrize("backend,layout,policy,dtype,d,heads", _grid())
def test_matches_eager_and_reference(backend, layout, policy, dtype, d, heads):
    vis, am = make_layout(layout)
    nk = vis.shape[1]
    q, k = make_qk(vis.shape[0], heads[0], heads[1], nk, nk, d, dtype)
    scale = 0.7 / math.sqrt(d)
    got = visual_attention_mass(q, k, vis, policy=policy, attention_mask=am, softmax_scale=scale, backend=backend)
    assert got.shape == (vis.shape[0], heads[0], nk) and got.dtype == torch.float32
    assert bool(((got >= 0) & (got <= 1)).all())

    ref32 = visual_mass_ref(q, k, vis, policy=policy, attention_mask=am, softmax_scale=scale)
    eager32 = eager_mass(q, k, vis, am, policy, True, scale, torch.float32)
    torch.testing.assert_close(eager32, ref32, atol=ATOL, rtol=0)
    assert_rule("visual_mass", got, eager32, eager_mass(q, k, vis, am, policy, True, scale, dtype))

    newest = visual_attention_mass(
        q, k, vis, policy=policy, attention_mask=am, softmax_scale=scale, query_positions=[-1], backend=backend
    )
    torch.testing.assert_close(newest, got[..., -1:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy,visual_self", [("dense", True), ("vskip", True), ("vskip", False), ("frozen", True)])
def test_newest_token_of_long_cache(backend, policy, visual_self):
    """One query, many key blocks: the triton path splits the key range and merges."""
    vis, _ = make_layout("long_cache")
    nk = vis.shape[1]
    dtype = torch.bfloat16 if visual_self else torch.float16
    q, k = make_qk(1, 7, 1, nk, nk, 64, dtype, seed=1)
    q_new = q[:, :, -1:]
    got = visual_attention_mass(q_new, k, vis, policy=policy, visual_self=visual_self, backend=backend)
    ref32 = visual_mass_ref(q_new, k, vis, policy=policy, visual_self=visual_self)
    reflp = eager_mass(q_new, k, vis, None, policy, visual_self, 0.125, dtype)
    assert_rule("visual_mass", got, ref32, reflp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_only_is_zero(backend):
    vis = torch.zeros(2, 80, dtype=torch.bool)
    q, k = make_qk(2, 4, 2, 20, 80, 64, torch.float16)
    for policy in POLICIES:
        got = visual_attention_mass(q, k, vis, policy=policy, backend=backend)
        assert torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_keys_never_count(backend):
    vis, am = make_layout("left_pad")
    q, k = make_qk(2, 4, 2, 8, vis.shape[1], 64, torch.float16, seed=2)
    base = visual_attention_mass(q, k, vis, policy="dense", attention_mask=am, backend=backend)
    k2 = k.clone()
    k2[0, :, :21] = 30.0  # would dominate every softmax if padding were attended
    vis2 = vis.clone()
    vis2[0, :21] = True  # and would count as visual
    moved = visual_attention_mass(q, k2, vis2, policy="dense", attention_mask=am, backend=backend)
    assert torch.equal(base, moved)


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_positions_unsorted_and_negative(backend):
    vis, am = make_layout("interleaved")
    nk = vis.shape[1]
    q, k = make_qk(1, 4, 1, 50, nk, 64, torch.float16, seed=3)
    full = visual_attention_mass(q, k, vis, policy="vskip", backend=backend)
    pos = [31, -1, 0, 7, -20]
    sel = visual_attention_mass(q, k, vis, policy="vskip", query_positions=pos, backend=backend)
    torch.testing.assert_close(sel, full[..., [31, 49, 0, 7, 30]], atol=ATOL, rtol=0)


def _expected_tiles(vis, am, nq, idx, policy, visual_self, hq, hkv, dtype, d):
    block_m, block_n = tvm.tile_plan(token_kind(vis, am), torch.as_tensor(idx), hq // hkv, dtype, d)
    rows = allowed_mask(vis, am, nq, policy, visual_self)[:, idx].repeat_interleave(hq // hkv, dim=1)
    live = live_tile_pairs(rows, block_m, block_n)
    return int(live.sum()) * hkv, live.numel() * hkv


@pytest.mark.parametrize(
    "layout,policy,visual_self,nq,sel",
    [
        ("long_cache", "vskip", True, 1, [0]),
        ("interleaved", "vskip", False, 112, list(range(112))),
        ("left_pad", "frozen", True, 96, list(range(0, 40, 5))),
        ("image_then_text", "dense", True, 96, [3, 60, 61, -90]),
    ],
    ids=lambda v: f"sel{len(v)}" if isinstance(v, list) else None,
)  # sel: the number of query positions
def test_triton_skips_dead_key_blocks(layout, policy, visual_self, nq, sel):
    vis, am = make_layout(layout)
    nk = vis.shape[1]
    q, k = make_qk(vis.shape[0], 4, 2, nq, nk, 64, torch.float16, seed=4)
    with ta.count_tiles() as counter:
        got = visual_attention_mass(
            q, k, vis, policy=policy, visual_self=visual_self, attention_mask=am, query_positions=sel, backend="triton"
        )
    ref = visual_mass_ref(q, k, vis, policy=policy, visual_self=visual_self, attention_mask=am, query_positions=sel)
    reflp = eager_mass(q, k, vis, am, policy, visual_self, 0.125, torch.float16)[..., sel]
    assert_rule("visual_mass", got, ref, reflp)
    expect, total = _expected_tiles(vis, am, nq, [s % nq for s in sel], policy, visual_self, 4, 2, torch.float16, 64)
    assert counter.value == expect
    assert expect < total  # the layouts have dead key blocks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "policy,layout,nq", [("vskip", "left_pad", 96), ("dense", "long_cache", 3), ("vskip", "long_cache", 2)]
)
def test_attention_mass_output_agrees(backend, nq, policy, layout):
    """modality_attention(..., return_visual_mass=True) (prefill and decode paths) gives
    the same visual mass as visual_attention_mass."""
    vis, am = make_layout(layout)
    nk = vis.shape[1]
    q, k = make_qk(vis.shape[0], 4, 2, nq, nk, 64, torch.float16, seed=5)
    v = torch.randn_like(k)
    _, from_attn = modality_attention(
        q, k, v, vis, policy=policy, attention_mask=am, return_visual_mass=True, backend=backend
    )
    direct = visual_attention_mass(q, k, vis, policy=policy, attention_mask=am, backend=backend)
    ref32 = visual_mass_ref(q, k, vis, policy=policy, attention_mask=am)
    reflp = eager_mass(q, k, vis, am, policy, True, 0.125, torch.float16)
    for name, got in (("attention", from_attn), ("visual_attention_mass", direct)):
        assert_rule(name, got, ref32, reflp)
    assert (from_attn - direct).abs().max().item() <= 2 * (reflp - ref32).abs().max().item() + ATOL


def test_specs_cover_every_launch_shape():
    """The compile gate sees every (dtype, padded width, row block) visual_mass launches,
    with the launcher's key block and warps."""
    specs = [s for s in tvm.aot_specs() if s.name.startswith("mass_split_")]
    for dt in ("fp16", "bf16", "fp32"):
        for block_d in tvm.BLOCK_DS:
            for block_m in tvm.row_blocks(dt):
                hit = [s for s in specs if s.name.startswith(f"mass_split_{dt}_bd{block_d}_m{block_m}_")]
                assert len(hit) == 1, (dt, block_d, block_m)
                assert hit[0].num_warps == tvm.SPLIT_WARPS
                assert hit[0].constexprs["BLOCK_N"] == tvm.split_block_n(block_d, dt)


@pytest.mark.cuda
class TestCuda:
    @pytest.mark.parametrize("d", (64, 80, 96, 128, 256))
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("policy", POLICIES)
    def test_newest_token_long_cache(self, dtype, d, policy):
        nk = 8192
        image = [(30, 6000), (6500, 7000)]
        vis, am = (t.cuda() for t in build_layout(nk, image, image, pad=(0, 900)))
        q, k = (t.cuda() for t in make_qk(2, 28, 4, 4, nk, d, dtype))
        with ta.count_tiles() as counter:
            got = visual_attention_mass(
                q, k, vis, policy=policy, attention_mask=am, query_positions=[-1], backend="triton"
            )
        ref = visual_mass_ref(q, k, vis, policy=policy, attention_mask=am, query_positions=[-1])
        reflp = eager_mass(q, k, vis, am, policy, True, d**-0.5, dtype)[..., -1:]
        assert_rule("visual_mass", got, ref, reflp)
        expect, _ = _expected_tiles(vis, am, 4, [3], policy, True, 28, 4, dtype, d)
        assert counter.value == expect

    def test_full_prefill_mass(self):
        vis, am = (t.cuda() if t is not None else None for t in make_layout("left_pad"))
        q, k = (t.cuda() for t in make_qk(2, 8, 2, 96, 96, 128, torch.float16))
        got = visual_attention_mass(q, k, vis, policy="vskip", attention_mask=am, backend="triton")
        ref = visual_mass_ref(q, k, vis, policy="vskip", attention_mask=am)
        assert_rule("visual_mass", got, ref, eager_mass(q, k, vis, am, "vskip", True, 128**-0.5, torch.float16))
