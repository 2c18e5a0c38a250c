"""Split-KV decode attention (ops/triton/decode.py) against reference.attention_ref.

Runs in Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1). Caches of
300-400 keys span 5-7 key tiles of the default schedule and 19-25 tiles of
16-key schedules, split 4 ways (7 where a test raises the split count). The
layout x policy x Nq grid rotates dtype, head dim and GQA group instead of taking
their full product, to stay within the CPU budget.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from python_tests._shared import assert_matches_reference, assert_rule, build_layout, make_qkv, spans
from vskip_kernels import modality_attention, plan_schedule
from vskip_kernels.ops.triton import attention as ta
from vskip_kernels.ops.triton import decode as td
from vskip_kernels.reference import allowed_mask, attention_ref, live_tile_pairs

POLICIES = ("dense", "vskip", "frozen")
DTYPES = (torch.float16, torch.bfloat16)
GROUPS = ((2, 2), (4, 1), (7, 1))  # (Hq, Hkv): GQA ratios 1, 4, 7

# name -> (Nk, visual ranges per sequence, left padding per sequence | None)
_LAYOUTS = {
    "image_then_text": (320, [[(10, 250)]], None),
    "interleaved": (400, [[(20, 120), (150, 260), (300, 380)]], None),
    "left_pad": (300, [[(100, 200)], [(5, 150), (220, 260)]], (90, 0)),
    # the image runs to the end: every decode query is visual
    "newest_visual": (350, [[(12, 350)]], None),
    # no text at all: vskip without self and frozen leave rows empty
    "visual_only": (300, [[(0, 300)]], None),
}


def make_layout(name):
    """(is_visual [B, Nk], attention_mask [B, Nk] | None)."""
    n, seqs, pad = _LAYOUTS[name]
    return build_layout(n, *seqs, pad=pad)


LAYOUTS = ("image_then_text", "interleaved", "left_pad", "newest_visual")


def _grid():
    cases = []
    for i, (layout, policy, nq) in enumerate(itertools.product(LAYOUTS, POLICIES, (1, 2, 4))):
        d = 80 if i == 7 else (64, 128)[(i // 2) % 2]
        cases.append((layout, policy, nq, DTYPES[i % 2], d, GROUPS[i % 3]))
    return cases


@pytest.mark.parametrize("layout,policy,nq,dtype,d,heads", _grid())
def test_public_decode_matches_reference(layout, policy, nq, dtype, d, heads):
    vis, am = make_layout(layout)
    q, k, v = make_qkv(vis.shape[0], heads[0], heads[1], nq, vis.shape[1], d, dtype)
    assert td.use_decode_path(q, k)
    res = modality_attention(
        q, k, v, vis, policy=policy, attention_mask=am, return_visual_mass=True, return_lse=True, backend="triton"
    )
    assert_matches_reference(res, q, k, v, vis, am, policy, True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vskip_without_self(layout):
    vis, am = make_layout(layout)
    q, k, v = make_qkv(vis.shape[0], 4, 1, 2, vis.shape[1], 64, torch.float16, seed=1)
    res = modality_attention(
        q,
        k,
        v,
        vis,
        policy="vskip",
        visual_self=False,
        attention_mask=am,
        return_visual_mass=True,
        return_lse=True,
        backend="triton",
    )
    assert_matches_reference(res, q, k, v, vis, am, "vskip", False)


@pytest.mark.parametrize("policy,visual_self", [("vskip", False), ("frozen", True), ("dense", True)])
def test_rows_without_keys_are_exact_zero(policy, visual_self):
    vis, am = make_layout("visual_only")
    q, k, v = make_qkv(1, 4, 2, 3, vis.shape[1], 64, torch.bfloat16, seed=2)
    out, mass, lse = modality_attention(
        q, k, v, vis, policy=policy, visual_self=visual_self, return_visual_mass=True, return_lse=True, backend="triton"
    )
    ref = assert_matches_reference((out, mass, lse), q, k, v, vis, am, policy, visual_self)
    if policy == "dense":
        assert torch.isfinite(lse).all() and torch.equal(mass, torch.ones_like(mass))
    else:
        assert torch.equal(out, torch.zeros_like(out)) and torch.equal(mass, torch.zeros_like(mass))
        assert torch.equal(lse, torch.full_like(lse, float("-inf"))) and torch.equal(lse, ref[2])


def test_out_only_and_padding_query():
    """Without extras only out comes back; a padded newest query gives exact zeros."""
    vis, am = make_layout("left_pad")
    am = am.clone()
    am[1, -1] = 0
    q, k, v = make_qkv(2, 4, 2, 2, vis.shape[1], 64, torch.float16, seed=3)
    out = modality_attention(q, k, v, vis, policy="vskip", attention_mask=am, backend="triton")
    assert isinstance(out, torch.Tensor)
    ref32 = attention_ref(q, k, v, vis, policy="vskip", attention_mask=am)
    reflp = attention_ref(q, k, v, vis, policy="vskip", attention_mask=am, upcast=False)
    assert_rule("out", out, ref32[0], reflp[0])
    assert torch.equal(out[1, :, -1], torch.zeros_like(out[1, :, -1]))


@pytest.fixture
def seven_splits(monkeypatch):
    monkeypatch.setattr(td, "CPU_SPLITS", 7)


# (policy, visual_self, dtype, d, (Hq, Hkv), nq): Nq=16 x 7 heads needs two row blocks
DIRECT_CASES = [
    ("vskip", True, torch.float16, 64, (7, 1), 16),
    ("dense", True, torch.bfloat16, 96, (8, 2), 3),
    ("frozen", True, torch.float32, 64, (2, 1), 1),
    ("vskip", False, torch.bfloat16, 128, (4, 4), 5),
]


@pytest.mark.parametrize("policy,visual_self,dtype,d,heads,nq", DIRECT_CASES)
def test_decode_forward_many_splits_and_tile_count(seven_splits, policy, visual_self, dtype, d, heads, nq):
    vis, am = make_layout("left_pad")
    nk = vis.shape[1]
    q, k, v = make_qkv(2, heads[0], heads[1], nq, nk, d, dtype, seed=4)
    sched = plan_schedule(vis, am, nq=nq, policy=policy, visual_self=visual_self, block_m=16, block_n=16)
    with ta.count_tiles() as counter:
        res = td.decode_forward(q, k, v, sched, d**-0.5, True, True)
    assert_matches_reference(res, q, k, v, vis, am, policy, visual_self)
    allowed = allowed_mask(vis, am, nq, policy, visual_self)
    live = live_tile_pairs(allowed, 16, 16)
    assert counter.value == int(live.sum()) * heads[0]
    assert counter.value < live.numel() * heads[0]  # some key tiles really skipped


def test_decode_forward_spans_several_query_tiles(seven_splits):
    """Nq > block_m: the decode tile visits the union of the query tiles' key tiles."""
    vis, am = make_layout("interleaved")
    nq, nk = 20, vis.shape[1]
    q, k, v = make_qkv(1, 2, 1, nq, nk, 64, torch.float16, seed=5)
    sched = plan_schedule(vis, am, nq=nq, policy="vskip", block_m=16, block_n=16)
    assert sched.num_m_tiles == 2
    with ta.count_tiles() as counter:
        res = td.decode_forward(q, k, v, sched, 0.125, True, True)
    assert_matches_reference(res, q, k, v, vis, am, "vskip", True)
    union = live_tile_pairs(allowed_mask(vis, am, nq, "vskip", True), 16, 16).any(1)
    assert counter.value == int(union.sum()) * 2


def test_empty_splits_of_a_mostly_padded_sequence(seven_splits):
    """Sequence 0 has 6 real tokens: most of its splits get no key tile at all."""
    vis, am = make_layout("left_pad")
    am = am.clone()
    am[0, :294] = 0
    q, k, v = make_qkv(2, 4, 1, 2, vis.shape[1], 64, torch.float16, seed=6)
    sched = plan_schedule(vis, am, nq=2, policy="dense", block_m=16, block_n=16)
    assert int(sched.part_cnt[0].sum() + sched.full_cnt[0].sum()) < td.CPU_SPLITS
    assert_matches_reference(td.decode_forward(q, k, v, sched, 0.125, True, True), q, k, v, vis, am, "dense", True)


def test_extras_not_requested_are_none():
    vis, am = make_layout("image_then_text")
    q, k, v = make_qkv(1, 2, 2, 1, vis.shape[1], 64, torch.float16)
    sched = plan_schedule(vis, am, nq=1, policy="vskip")
    out, mass, lse = td.decode_forward(q, k, v, sched, 0.125, False, False)
    assert mass is None and lse is None
    ref32, reflp = (attention_ref(q, k, v, vis, policy="vskip", upcast=u)[0] for u in (True, False))
    assert_rule("out", out, ref32, reflp)


def test_public_api_dispatches_decode(monkeypatch):
    calls = []
    real = td.decode_forward
    monkeypatch.setattr(td, "decode_forward", lambda *a: calls.append(a[0].shape) or real(*a))
    vis, am = make_layout("image_then_text")
    q, k, v = make_qkv(1, 2, 2, 16, vis.shape[1], 64, torch.float16)
    modality_attention(q, k, v, vis, policy="dense", backend="triton")
    assert calls == [q.shape]
    assert td.use_decode_path(q, k) and not td.use_decode_path(torch.empty(1, 2, 17, 64), k)


def test_decode_forward_rejects_bad_input():
    vis, _ = make_layout("image_then_text")
    q, k, v = make_qkv(1, 2, 2, 2, vis.shape[1], 64, torch.float16)
    sched = plan_schedule(vis[:, :-1], nq=2, policy="vskip")
    with pytest.raises(ValueError, match="schedule was planned"):
        td.decode_forward(q, k, v, sched, 0.125, True, True)
    sched = plan_schedule(vis, nq=2, policy="vskip")
    with pytest.raises(ValueError, match="head dims"):
        td.decode_forward(q[..., :8], k[..., :8], v[..., :8], sched, 0.125, True, True)
    with pytest.raises(ValueError, match="float16, bfloat16 and float32"):
        td.decode_forward(q.double(), k.double(), v.double(), sched, 0.125, True, True)


@pytest.mark.cuda
class TestCuda:
    """Real-GPU decode: long caches, every tuned head dim, several splits per KV head."""

    @pytest.mark.parametrize("d", (64, 80, 96, 128, 256))
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("policy", POLICIES)
    def test_long_cache(self, dtype, d, policy):
        nk = 4096
        image = [(30, 2500), (3000, 3600)]
        vis, am = (t.cuda() for t in build_layout(nk, image, image, pad=(0, 700)))
        for nq, heads in ((1, (28, 4)), (4, (8, 8)), (16, (32, 8))):
            q, k, v = (t.cuda() for t in make_qkv(2, heads[0], heads[1], nq, nk, d, dtype, seed=nq))
            res = modality_attention(
                q,
                k,
                v,
                vis,
                policy=policy,
                attention_mask=am,
                return_visual_mass=True,
                return_lse=True,
                backend="triton",
            )
            assert_matches_reference(res, q, k, v, vis, am, policy, True)

    def test_newest_token_of_32k_cache_counts_tiles(self):
        nk = 32768
        vis = spans(nk, [(100, 30000)])[None].cuda()
        q, k, v = (t.cuda() for t in make_qkv(1, 28, 4, 1, nk, 128, torch.bfloat16))
        sched = plan_schedule(vis, nq=1, policy="vskip", block_m=64, block_n=64)
        assert td.num_splits(4, sched.num_n_tiles, q.device) > 1
        with ta.count_tiles() as counter:
            res = td.decode_forward(q, k, v, sched, 128**-0.5, True, True)
        assert_matches_reference(res, q, k, v, vis, None, "vskip", True)
        assert counter.value == int(sched.live_pairs()) * 28
