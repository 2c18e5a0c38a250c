"""Attention implementations the suites compare against, each as a zero-argument callable.

All inputs are prepared before the callable is built, so only the attention
itself is timed (masks, block masks, layout transposes and compilation are not).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from vskip_kernels.flex import mask_mod_from_kind
from vskip_kernels.kinds import token_kind


def flash_attn_module():
    """flash-attn 2 when importable, else (None, reason)."""
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_func, flash_attn_with_kvcache
    except Exception as exc:
        return (
            None,
            f"flash-attn not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
        )
    return (flash_attn_func, flash_attn_with_kvcache), None


def bool_mask(is_visual, nq, policy, visual_self=True):
    """[B, 1, Nq, Nk] bool, True = attend: the explicit mask SDPA and eager baselines get.

    The library's FlexAttention ``mask_mod`` evaluated on broadcast index grids (the same
    mask as ``reference.allowed_mask``, which production code, this package included, does
    not import; python_tests/bench checks the two agree)."""
    b, nk = is_visual.shape
    dev = is_visual.device
    mod = mask_mod_from_kind(token_kind(is_visual), policy, nq=nq, visual_self=visual_self)
    return mod(
        torch.arange(b, device=dev)[:, None, None],
        None,
        torch.arange(nq, device=dev)[None, :, None],
        torch.arange(nk, device=dev)[None, None, :],
    )[:, None]


def sdpa(q, k, v, mask=None):
    gqa = q.shape[1] != k.shape[1]
    nq, nk = q.shape[2], k.shape[2]
    if mask is not None and gqa:
        # SDPA's masked kernels take no GQA; expanding K/V here (untimed) keeps it off the math path
        rep = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
    if mask is None:
        if nq == nk:
            return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if nq == 1:  # the newest token sees the whole cache
            return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        raise ValueError("sdpa baseline without a mask needs Nq == Nk or Nq == 1")
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def sdpa_flash(q, k, v):
    """Causal SDPA pinned to its flash backend (the dense peer when flash-attn is absent);
    raises, and is recorded as skipped, where that backend cannot run these inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if q.shape[2] != k.shape[2]:
        raise ValueError("the sdpa flash baseline is causal prefill: it needs Nq == Nk")
    gqa = q.shape[1] != k.shape[1]

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    run()  # fails here, before timing, when the flash backend does not take these inputs
    return run


def eager(q, k, v, mask):
    """matmul -> softmax -> matmul with an additive mask, the way HF's eager attention
    (and the papers' analysis code, which needs the probabilities) runs."""
    add = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, torch.finfo(q.dtype).min)
    rep = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])

    def run():
        kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k
        vv = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        s = torch.matmul(q, kk.transpose(-1, -2)) * scale + add
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, vv)

    return run


def eager_probs(q, k, mask):
    """Attention probabilities [B, H, Nq, Nk] as output_attentions=True returns them."""
    add = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, torch.finfo(q.dtype).min)
    rep = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])

    def probs():
        kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k
        s = torch.matmul(q, kk.transpose(-1, -2)) * scale + add
        return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)

    return probs


def flex_mask_mod(kind: torch.Tensor, nq: int, policy: str, visual_self: bool = True):
    """The policy of DESIGN.md as a FlexAttention mask_mod over the token-kind tensor."""
    off = kind.shape[1] - nq

    def mask_mod(b, h, q_idx, kv_idx):
        qp = q_idx + off
        kq, kk = kind[b, qp], kind[b, kv_idx]
        ok = (kv_idx <= qp) & (kq != 0) & (kk != 0)
        if policy == "vskip":
            blocked = (kq == 2) & (kk == 2)
            if visual_self:
                blocked = blocked & (kv_idx != qp)
            ok = ok & ~blocked
        elif policy == "frozen":
            ok = ok & (kq != 2)
        return ok

    return mask_mod


def flex(q, k, v, kind, policy, *, compiled: bool, visual_self: bool = True):
    """FlexAttention with a block mask built (and the kernel compiled) before timing.

    Returns (callable, backend name); uncompiled flex runs its reference math path
    and is named so in the results.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    nq, nk = q.shape[2], k.shape[2]
    bm = create_block_mask(flex_mask_mod(kind, nq, policy, visual_self), kind.shape[0], None, nq, nk, device=q.device)
    if compiled:
        # every shape and policy compiles anew; without a reset dynamo's recompile limit would
        # silently drop later cases to the unfused path
        torch._dynamo.reset()
    fa = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    gqa = q.shape[1] != k.shape[1]
    fn = lambda: fa(q, k, v, block_mask=bm, enable_gqa=gqa)
    with warnings.catch_warnings():
        # uncompiled flex warns that it is unfused; the result is named so, the warning adds nothing
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        fn()  # compile (or fail) here, outside the timed region
    return fn, "flex_attention" if compiled else "flex_attention (not compiled)"


def flash_attn_dense(q, k, v):
    mods, reason = flash_attn_module()
    if mods is None:
        raise RuntimeError(reason)
    func = mods[0]
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return lambda: func(qt, kt, vt, causal=True)


def flash_attn_decode(q, k, v):
    """flash_attn_with_kvcache: q [B, 1, H, D] against a full cache [B, Nk, Hkv, D]."""
    mods, reason = flash_attn_module()
    if mods is None:
        raise RuntimeError(reason)
    func = mods[1]
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    seqlens = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)
    return lambda: func(qt, kt, vt, cache_seqlens=seqlens, causal=True)
