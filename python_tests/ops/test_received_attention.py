"""Received attention (FastV / PyramidDrop ranking): public ``received_attention`` on the triton
(interpreter on CPU) and torch backends, against reference.received_attention_ref and an eager
softmax in the input dtype computed here (the tolerance rule's low-precision reference).

Small shapes keep the interpreter within budget; the layout x policy grid rotates dtype, head
dim, GQA group and the chosen queries instead of taking their full product.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from python_tests._shared import assert_rule, build_layout, make_qkv
from vskip_kernels import modality_attention, received_attention
from vskip_kernels.ops.triton import received as tr
from vskip_kernels.ops.triton.common import count_tiles
from vskip_kernels.reference import allowed_mask, received_attention_ref

POLICIES = ("dense", "vskip", "frozen")
BACKENDS = ("triton", "torch")
DTYPES = (torch.float16, torch.bfloat16)
GROUPS = ((2, 2), (4, 1), (7, 1))  # (Hq, Hkv): GQA ratios 1, 4, 7
CHOSEN = (None, [-1], [3, -1, 40, -9])  # every query (FastV paper), the last (FastV code), a few

# name -> (Nk, visual ranges per sequence, left padding per sequence | None)
_LAYOUTS = {
    "image_then_text": (96, [[(8, 60)]], None),
    "interleaved": (112, [[(4, 30), (41, 70), (80, 100)]], None),
    "left_pad": (96, [[(30, 70)], [(0, 40), (60, 90)]], (21, 0)),
    "ends_visual": (80, [[(20, 80)]], None),  # the last query is visual: vskip ranks by its self key only
}


def eager_received(q, k, vis, am, policy, scale, dtype, chosen):
    """The ranking from a materialised softmax in ``dtype`` (as output_attentions gives it)."""
    group = q.shape[1] // k.shape[1]
    qd, kd = q.to(dtype), k.repeat_interleave(group, dim=1).to(dtype)
    allowed = allowed_mask(vis, am, q.shape[2], policy)
    scores = (qd @ kd.transpose(-1, -2) * scale).masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.where(allowed[:, None], torch.softmax(scores, dim=-1), torch.zeros((), dtype=dtype))
    if chosen is not None:
        idx = torch.tensor(chosen) % q.shape[2]
        probs, allowed = probs[:, :, idx], allowed[:, idx]
    count = allowed.sum(1)
    got = probs.float().sum(2).mean(1) / count.clamp_min(1)
    return torch.where(count > 0, got, torch.zeros_like(got))


def _grid():
    cases = []
    for i, (layout, policy) in enumerate(itertools.product(_LAYOUTS, POLICIES)):
        d = 80 if i == 4 else (64, 128)[(i // 2) % 2]
        for backend in BACKENDS:
            cases.append((backend, layout, policy, DTYPES[i % 2], d, GROUPS[i % 3], CHOSEN[i % 3]))
    return cases


@pytest.mark.parametrize("backend,layout,policy,dtype,d,heads,chosen", _grid())
def test_matches_reference_and_eager(backend, layout, policy, dtype, d, heads, chosen):
    n, seqs, pad = _LAYOUTS[layout]
    vis, am = build_layout(n, *seqs, pad=pad)
    q, k, v = make_qkv(vis.shape[0], heads[0], heads[1], n, n, d, dtype, seed=5)
    scale = 0.7 / math.sqrt(d)
    kw = dict(policy=policy, attention_mask=am, softmax_scale=scale)
    _, lse = modality_attention(q, k, v, vis, return_lse=True, backend=backend, **kw)
    got = received_attention(q, k, vis, lse=lse, query_positions=chosen, backend=backend, **kw)
    assert got.shape == vis.shape and got.dtype == torch.float32
    ref = received_attention_ref(q, k, vis, query_positions=chosen, **kw)
    assert_rule(f"{layout}-{policy}", got, ref, eager_received(q, k, vis, am, policy, scale, dtype, chosen))
    # what the ranking is for: which keys are allowed to receive anything
    allowed = allowed_mask(vis, am, n, policy)
    if chosen is not None:
        allowed = allowed[:, torch.tensor(chosen) % n]
    assert torch.equal(got > 0, allowed.any(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_and_lse_computed_when_not_given(backend):
    vis, am = build_layout(72, [(10, 50)], [(0, 30)], pad=(0, 9))
    q, k, _ = make_qkv(2, 4, 2, 72, 72, 32, torch.float32, seed=6)
    got = received_attention(q, k, vis, policy="vskip", attention_mask=am, backend=backend)
    ref = received_attention_ref(q, k, vis, policy="vskip", attention_mask=am)
    assert torch.allclose(got, ref, atol=1e-6, rtol=1e-4)
    last = received_attention(q, k, vis, policy="vskip", attention_mask=am, query_positions=-1, backend=backend)
    ref_last = received_attention_ref(q, k, vis, policy="vskip", attention_mask=am, query_positions=[-1])
    assert torch.allclose(last, ref_last, atol=1e-6, rtol=1e-4)
    # one query: a probability distribution over the keys it may attend (head-averaged)
    assert torch.allclose(last.sum(1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("policy", POLICIES)
def test_triton_skips_tiles_nothing_can_receive(policy):
    """Processed (row block, key tile) pairs equal the pairs holding an allowed entry, from the
    reference mask: a row block never loads Q for a key tile it cannot attend."""
    n, hq, hkv, d = 150, 4, 2, 64
    vis, _ = build_layout(n, [(5, 70), (90, 140)])
    q, k, _ = make_qkv(1, hq, hkv, n, n, d, torch.float16, seed=7)
    _, lse = modality_attention(q, k, k, vis, policy=policy, return_lse=True, backend="triton")
    with count_tiles(device="cpu") as tiles:
        received_attention(q, k, vis, lse=lse, policy=policy, backend="triton")
    block_m, block_n = tr.tile_plan(n, hq // hkv, torch.float16, d)
    allowed = allowed_mask(vis, None, n, policy)[0]  # [Nq, Nk]
    rows = allowed.repeat_interleave(hq // hkv, dim=0)  # rows are (query, head of the group)
    live = sum(
        bool(rows[m : m + block_m, j : j + block_n].any())
        for m in range(0, rows.shape[0], block_m)
        for j in range(0, n, block_n)
    )
    assert tiles.value == live * hkv
    dense_pairs = -(-rows.shape[0] // block_m) * -(-n // block_n) * hkv
    assert tiles.value < dense_pairs  # causality (and the policy) left tiles out


def test_bad_arguments_name_the_argument():
    vis, _ = build_layout(40, [(5, 20)])
    q, k, _ = make_qkv(1, 2, 2, 40, 40, 16, torch.float32)
    with pytest.raises(ValueError, match="lse must be float32"):
        received_attention(q, k, vis, lse=torch.zeros(1, 2, 39))
    with pytest.raises(ValueError, match="lse must be float32"):
        received_attention(q, k, vis, lse=torch.zeros(1, 2, 40, dtype=torch.float64))
    with pytest.raises(ValueError, match="query_positions"):
        received_attention(q, k, vis, query_positions=[40])
    with pytest.raises(ValueError, match="is_visual"):
        received_attention(q, k, vis[:, :30])
    with pytest.raises(ValueError, match="policy"):
        received_attention(q, k, vis, policy="sparse")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32))
@pytest.mark.parametrize("chosen", (None, [-1]))
def test_native_gpu_matches_reference(dtype, chosen):
    n, d = 1100, 128
    vis, _ = build_layout(n, [(35, 611)], [(20, 900), (950, 1050)])
    q, k, v = (t.cuda() for t in make_qkv(2, 8, 2, n, n, d, dtype, seed=8))
    vis = vis.cuda()
    _, lse = modality_attention(q, k, v, vis, policy="vskip", return_lse=True, backend="triton")
    got = received_attention(q, k, vis, lse=lse, policy="vskip", query_positions=chosen, backend="triton").cpu()
    qc, kc, vc = q.cpu(), k.cpu(), vis.cpu()
    ref = received_attention_ref(qc, kc, vc, policy="vskip", query_positions=chosen)
    low = eager_received(qc, kc, vc, None, "vskip", 1 / math.sqrt(d), dtype, chosen)
    assert_rule(f"gpu-{dtype}", got, ref, low, atol=1e-6)
