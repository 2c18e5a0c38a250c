"""FlexAttention interop: our mask_mod gives FlexAttention the reference's semantics, and a
planned Schedule is the same block structure FlexAttention derives from that mask_mod."""

import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import vskip_kernels as vk
from vskip_kernels.flex import mask_mod
from vskip_kernels.ops.attention import default_block_sizes
from vskip_kernels.reference import attention_ref

B, HQ, HKV, NK, D = 2, 4, 2, 200, 32


def _inputs(nq, seed=0):
    g = torch.Generator().manual_seed(seed)
    # text, one image of 150 tokens (row 1: with a few text tokens inside), text
    is_visual = torch.zeros(B, NK, dtype=torch.bool)
    is_visual[:, 30:180] = True
    is_visual[1, 100:103] = False
    attention_mask = torch.ones(B, NK, dtype=torch.long)
    attention_mask[1, :17] = 0  # left padding in one row
    q = torch.randn(B, HQ, nq, D, generator=g)
    k = torch.randn(B, HKV, NK, D, generator=g)
    v = torch.randn(B, HKV, NK, D, generator=g)
    return q, k, v, is_visual, attention_mask


def _flex(q, k, v, block_mask):
    with warnings.catch_warnings():  # eager flex says it is unfused; that is the point here
        warnings.simplefilter("ignore")
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)


CASES = [
    (p, vs, nq) for p in ("dense", "vskip", "frozen") for vs in (True, False) for nq in (NK, 37) if p == "vskip" or vs
]


@pytest.mark.parametrize("blocks", [(64, 64), (128, 64)])
@pytest.mark.parametrize("policy,visual_self,nq", CASES)
def test_flex_with_our_mask_mod_and_our_block_mask_equal_the_reference(policy, visual_self, nq, blocks):
    q, k, v, iv, am = _inputs(nq)
    ref, _, _ = attention_ref(q, k, v, iv, policy=policy, attention_mask=am, visual_self=visual_self)
    bm = create_block_mask(
        mask_mod(iv, policy, am, nq=nq, visual_self=visual_self), B, None, nq, NK, device="cpu", BLOCK_SIZE=blocks
    )
    torch.testing.assert_close(_flex(q, k, v, bm), ref, rtol=1e-5, atol=1e-5)
    sched = vk.plan_schedule(
        iv, am, nq=nq, policy=policy, visual_self=visual_self, block_m=blocks[0], block_n=blocks[1]
    )
    torch.testing.assert_close(_flex(q, k, v, sched.to_block_mask()), ref, rtol=1e-5, atol=1e-5)
    # The same tiles: FlexAttention's computed and full blocks are our live and full tiles.
    assert torch.equal(bm.to_dense()[:, 0].bool(), sched.live_mask())
    full = torch.zeros_like(sched.live_mask())
    for b in range(B):
        for m in range(full.shape[1]):
            n = int(bm.full_kv_num_blocks[b, 0, m])
            full[b, m, bm.full_kv_indices[b, 0, m, :n].long()] = True
    assert torch.equal(full, sched.full_mask())
    if policy != "dense":  # the policy changes the result, so the comparison can fail
        dense, _, _ = attention_ref(q, k, v, iv, policy="dense", attention_mask=am)
        assert (dense - ref).abs().max() > 1e-2


def test_mask_mod_rejects_bad_input():
    iv = torch.zeros(2, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="policy"):
        mask_mod(iv, "sparse")
    with pytest.raises(TypeError, match="is_visual"):
        mask_mod(iv.long(), "vskip")
    with pytest.raises(ValueError, match="nq"):
        mask_mod(iv, "vskip", nq=9)
    with pytest.raises(ValueError, match="attention_mask"):
        mask_mod(iv, "vskip", torch.ones(2, 7, dtype=torch.long))


def test_schedule_planned_like_q_uses_the_kernels_tile_shape():
    q, _, _, iv, am = _inputs(NK)
    sched = vk.plan_schedule(iv, am, policy="vskip", like=q)
    assert (sched.block_m, sched.block_n) == default_block_sizes(q, "torch")
    assert sched.nq == q.shape[2]
    assert vk.plan_schedule(iv, am, like=q, block_n=32).block_n == 32
    short = vk.plan_schedule(iv, am, like=q[:, :, -5:])
    assert short.nq == 5
    with pytest.raises(ValueError, match="like"):
        vk.plan_schedule(iv, am, like=q[0])


def test_schedule_repr_fraction_and_to():
    _, _, _, iv, am = _inputs(NK)
    sched = vk.plan_schedule(iv, am, policy="vskip", block_m=32, block_n=32)
    live = sched.live_mask()
    assert sched.live_tile_fraction() == pytest.approx(float(live.float().mean()))
    dense = vk.plan_schedule(iv, am, policy="dense", block_m=32, block_n=32)
    assert sched.live_tile_fraction() < dense.live_tile_fraction()
    text = repr(sched)
    assert "policy='vskip'" in text and f"live={100 * sched.live_tile_fraction():.2f}%" in text
    assert "tiles=7x7" in text and "device=cpu" in text
    assert sched.to("cpu") is sched
    meta = sched.to("meta")
    assert meta.device.type == "meta" and meta.full_idx.shape == sched.full_idx.shape and meta.policy == "vskip"
