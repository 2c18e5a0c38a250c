"""Helpers shared by the kernel test files (ops/) and the CUDA integration test: layout
builders, random inputs and the tolerance rule (``from python_tests._shared import ...``)."""

from __future__ import annotations

import torch

from vskip_kernels.reference import attention_ref

# Tiny absolute slack on top of 2x the low-precision reference's error (the common tolerance rule).
ATOL = 1e-5


def spans(n, ranges):
    """is_visual [n] with the [a, b) ranges set."""
    vis = torch.zeros(n, dtype=torch.bool)
    for a, b in ranges:
        vis[a:b] = True
    return vis


def build_layout(n, *sequences, pad=None):
    """(is_visual [B, n], attention_mask [B, n] | None): one list of visual [a, b)
    ranges per sequence; ``pad`` gives each sequence's count of left-padding positions."""
    vis = torch.stack([spans(n, ranges) for ranges in sequences])
    if pad is None:
        return vis, None
    am = torch.ones(len(sequences), n, dtype=torch.int64)
    for b, p in enumerate(pad):
        am[b, :p] = 0
    return vis, am


def make_qkv(b, hq, hkv, nq, nk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    return q, k, v


def assert_rule(name, got, ref32, reflp, atol=ATOL):
    """The tolerance rule: error vs the fp32 reference within 2x the low-precision
    reference's, plus ``atol``, over the entries finite in the fp32 reference; the
    non-finite entries (lse of empty rows) of both must match it exactly."""
    got, ref32, reflp = got.float(), ref32.float(), reflp.float()
    assert not torch.isnan(got).any(), f"{name} has NaN"
    fin = torch.isfinite(ref32)
    for what, t in (("result", got), ("low-precision reference", reflp)):
        assert torch.equal(torch.isfinite(t), fin), f"{name}: finite entries of the {what} differ from the reference"
        assert torch.equal(t[~fin], ref32[~fin]), f"{name}: non-finite entries of the {what} differ from the reference"
    if not fin.any():
        return
    err = (got - ref32)[fin].abs().max().item()
    lim = 2 * (reflp - ref32)[fin].abs().max().item() + atol
    assert err <= lim, f"{name}: max error {err:.3g} > {lim:.3g} (2x low-precision reference + {atol})"


def assert_matches_reference(res, q, k, v, vis, am, policy, visual_self, out_atol=ATOL):
    """``res`` = (out, visual mass, lse), None where not requested, against
    reference.attention_ref under the tolerance rule; returns the fp32 reference."""
    kw = dict(policy=policy, attention_mask=am, visual_self=visual_self)
    ref32 = attention_ref(q, k, v, vis, **kw)
    reflp = attention_ref(q, k, v, vis, upcast=False, **kw)
    for name, got, r32, rlp, atol in zip(("out", "visual_mass", "lse"), res, ref32, reflp, (out_atol, ATOL, ATOL)):
        if got is None:
            continue
        assert got.shape == r32.shape, (name, got.shape, r32.shape)
        assert got.dtype == r32.dtype, (name, got.dtype, r32.dtype)
        assert_rule(name, got, r32, rlp, atol)
    return ref32
