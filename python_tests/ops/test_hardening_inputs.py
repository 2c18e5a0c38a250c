"""Hardening: degenerate shapes, non-finite inputs and memory of the Triton kernels.

* empty batch, zero-length sequences, zero heads / head dim and Nq > Nk are clear
  ValueErrors on every public entry point and backend (before any kernel runs);
* NaN/inf in q, k or v: the Triton kernels follow the torch backend's documented rules
  (ops/pytorch/attention.py) and rows that are empty by contract stay exact zeros;
* the Triton path never allocates anything N x N (allocation functions are wrapped and
  only calls made from vskip_kernels code count).
"""

from __future__ import annotations

import sys

import pytest
import torch

from vskip_kernels import modality_attention, modality_attention_varlen, plan_schedule, visual_attention_mass
from vskip_kernels.reference import allowed_mask, attention_ref

BACKENDS = ("torch", "triton")
POLICY_CASES = (("dense", True), ("vskip", False), ("frozen", True))


def qkv(b=2, hq=4, hkv=2, nq=8, nk=8, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, hq, nq, d, generator=g),
        torch.randn(b, hkv, nk, d, generator=g),
        torch.randn(b, hkv, nk, d, generator=g),
        torch.zeros(b, nk, dtype=torch.bool),
    )


# --------------------------------------------------------------------------- degenerate shapes

# (name, (q, k, v, is_visual) -> same, message)
SHAPES = [
    ("empty batch", lambda q, k, v, vis: (q[:0], k[:0], v[:0], vis[:0]), "empty batch"),
    ("zero-length", lambda q, k, v, vis: (q[:, :, :0], k[:, :, :0], v[:, :, :0], vis[:, :0]), "zero-length sequence"),
    ("no queries", lambda q, k, v, vis: (q[:, :, :0], k, v, vis), "zero-length sequence: q has Nq=0"),
    ("Nq > Nk", lambda q, k, v, vis: (q, k[:, :, :5], v[:, :, :5], vis[:, :5]), "Nq=8 queries but k has only Nk=5"),
    ("no query heads", lambda q, k, v, vis: (q[:, :0], k, v, vis), "at least one head"),
    ("head dim 0", lambda q, k, v, vis: (q[..., :0], k[..., :0], v[..., :0], vis), "non-zero head dim"),
    ("no kv heads", lambda q, k, v, vis: (q, k[:, :0], v[:, :0], vis), r"key/value heads \(0\)"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cut, match", [s[1:] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_degenerate_shapes_attention(cut, match, backend):
    q, k, v, vis = cut(*qkv())
    with pytest.raises(ValueError, match=match):
        modality_attention(q, k, v, vis, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cut, match", [s[1:] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_degenerate_shapes_visual_mass(cut, match, backend):
    q, k, _, vis = cut(*qkv())
    with pytest.raises(ValueError, match=match):
        visual_attention_mass(q, k, vis, backend=backend)


def _packed(lens_q, lens_k, hq=2, hkv=1, d=64):
    g = torch.Generator().manual_seed(1)
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    tq, tk = sum(lens_q), sum(lens_k)
    return (
        torch.randn(tq, hq, d, generator=g),
        torch.randn(tk, hkv, d, generator=g),
        torch.randn(tk, hkv, d, generator=g),
        cu(lens_q),
        cu(lens_k),
        torch.zeros(tk, dtype=torch.bool),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_shapes_varlen(backend):
    q, k, v, cq, ck, vis = _packed([3, 4], [5, 6])
    empty = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="empty batch: cu_seqlens_q"):
        modality_attention_varlen(q[:0], k[:0], v[:0], empty, empty, 0, 0, vis[:0], backend=backend)
    with pytest.raises(ValueError, match="sequence 1 has 7 queries but only 6 keys"):
        q2, _, _, cq2, _, _ = _packed([3, 7], [5, 6])
        modality_attention_varlen(q2, k, v, cq2, ck, 7, 6, vis, backend=backend)
    with pytest.raises(ValueError, match="non-zero head dim"):
        modality_attention_varlen(q[..., :0], k[..., :0], v[..., :0], cq, ck, 4, 6, vis, backend=backend)
    # Zero-length sequences inside a batch are part of the packed layout, not an error;
    # a batch of only zero-length sequences gives an empty packed output.
    q0, k0, v0, cq0, ck0, vis0 = _packed([0, 0], [0, 0])
    out = modality_attention_varlen(q0, k0, v0, cq0, ck0, 0, 0, vis0, backend=backend)
    assert out.shape == (0, 2, 64)


@pytest.mark.parametrize("backend", ("torch", "auto"))
def test_degenerate_shapes_plan_schedule(backend):
    vis = torch.zeros(2, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="empty batch"):
        plan_schedule(vis[:0], backend=backend)
    with pytest.raises(ValueError, match="zero-length"):
        plan_schedule(vis[:, :0], backend=backend)
    with pytest.raises(ValueError, match=r"nq must be in \[1, Nk=8\], got 9"):
        plan_schedule(vis, nq=9, backend=backend)
    with pytest.raises(ValueError, match=r"nq must be in \[1, Nk=8\], got 0"):
        plan_schedule(vis, nq=0, backend=backend)


# --------------------------------------------------------------------------- non-finite inputs

N = 140  # several key tiles: decode and visual mass split the keys and merge the partials


def nonfinite_case():
    """Sequence 0 is one image from position 0 (vskip without self / frozen: every row empty);
    sequence 1 has text around an image, left padding and a padding query at the end."""
    vis = torch.zeros(2, N, dtype=torch.bool)
    vis[0] = True
    vis[1, 5:25] = True
    mask = torch.ones(2, N, dtype=torch.int32)
    mask[1, :3] = 0
    mask[1, -1] = 0
    q, k, v, _ = qkv(b=2, hq=4, hkv=2, nq=N, nk=N, d=64, seed=3)
    return q.half(), k.half(), v.half(), vis, mask


def run(q, k, v, vis, mask, nq, policy, visual_self, backend):
    return modality_attention(
        q[:, :, -nq:],
        k,
        v,
        vis,
        policy=policy,
        attention_mask=mask,
        visual_self=visual_self,
        return_visual_mass=True,
        return_lse=True,
        backend=backend,
    )


def attending(vis, mask, nq, policy, visual_self, j):
    """[B, Hq, Nq] rows of kv head 0 (query heads 0, 1) that may attend key j."""
    att = allowed_mask(vis, mask, nq, policy, visual_self)[:, :, j]
    rows = torch.zeros(2, 4, nq, dtype=torch.bool)
    rows[:, :2] = att[:, None]
    return rows


def empty_rows(vis, mask, nq, policy, visual_self):
    return (~allowed_mask(vis, mask, nq, policy, visual_self).any(-1))[:, None].expand(2, 4, nq)


def assert_empty_rows_exact(res, empty):
    out, mass, lse = res
    assert empty.any()
    assert (out[empty] == 0).all() and (mass[empty] == 0).all() and (lse[empty] == float("-inf")).all()


@pytest.mark.parametrize("value", (float("nan"), float("inf")))
@pytest.mark.parametrize("nq", (N, 3), ids=("prefill", "decode"))
@pytest.mark.parametrize("policy, visual_self", POLICY_CASES)
def test_non_finite_k_matches_torch_backend(nq, policy, visual_self, value):
    """NaN/inf in k at key j: exactly the rows attending j are non-finite (the same rows as the
    torch backend); every other row is bitwise the clean result."""
    q, k, v, vis, mask = nonfinite_case()
    clean = run(q, k, v, vis, mask, nq, policy, visual_self, "triton")
    j = 30  # text in sequence 1, visual in sequence 0
    k[:, 0, j] = value
    got = run(q, k, v, vis, mask, nq, policy, visual_self, "triton")
    ref = run(q, k, v, vis, mask, nq, policy, visual_self, "torch")
    bad = attending(vis, mask, nq, policy, visual_self, j)
    assert bad.any()
    for a, c, r in zip(got, clean, ref):
        assert torch.equal(a.isfinite(), r.isfinite())
        assert not a[bad].isfinite().all(-1).any()
        assert torch.equal(a[~bad], c[~bad])
    assert_empty_rows_exact(got, empty_rows(vis, mask, nq, policy, visual_self))


@pytest.mark.parametrize("value", (float("nan"), float("-inf")))
@pytest.mark.parametrize("nq", (N, 3), ids=("prefill", "decode"))
def test_non_finite_q_poisons_only_its_row(nq, value):
    q, k, v, vis, mask = nonfinite_case()
    clean = run(q, k, v, vis, mask, nq, "vskip", True, "triton")
    q[1, 3, -2, 5] = value  # a text query of sequence 1
    got = run(q, k, v, vis, mask, nq, "vskip", True, "triton")
    bad = torch.zeros(2, 4, nq, dtype=torch.bool)
    bad[1, 3, -2] = True
    out = got[0]
    assert out[bad].isnan().all() and got[2][bad].isnan().all()
    for a, c in zip(got, clean):
        assert torch.equal(a[~bad], c[~bad])


@pytest.mark.parametrize("value", (float("nan"), float("inf")))
@pytest.mark.parametrize("nq", (N, 3), ids=("prefill", "decode"))
@pytest.mark.parametrize("policy, visual_self", POLICY_CASES)
def test_non_finite_v_never_reaches_empty_rows(nq, policy, visual_self, value):
    """NaN/inf in v at key j: rows attending j are non-finite, mass and lse (which never read v)
    are unchanged, and empty rows stay exact zeros even though their tiles read j (0 * NaN)."""
    q, k, v, vis, mask = nonfinite_case()
    poisoned = v.clone()
    j = 30
    poisoned[:, 0, j, :] = value
    for backend in BACKENDS:
        clean = run(q, k, v, vis, mask, nq, policy, visual_self, backend)
        got = run(q, k, poisoned, vis, mask, nq, policy, visual_self, backend)
        bad = attending(vis, mask, nq, policy, visual_self, j)
        assert not got[0][bad].isfinite().all(-1).any(), backend
        assert torch.equal(got[1], clean[1]) and torch.equal(got[2], clean[2]), backend
        assert_empty_rows_exact(got, empty_rows(vis, mask, nq, policy, visual_self))


@pytest.mark.parametrize("policy, visual_self", POLICY_CASES)
def test_non_finite_k_visual_mass(policy, visual_self):
    q, k, _, vis, mask = nonfinite_case()
    sel = [0, 7, 20, 31, -1]
    kw = dict(policy=policy, attention_mask=mask, visual_self=visual_self, query_positions=sel)
    clean = visual_attention_mass(q, k, vis, backend="triton", **kw)
    k[:, 1, 30] = float("nan")
    got = visual_attention_mass(q, k, vis, backend="triton", **kw)
    ref = visual_attention_mass(q, k, vis, backend="torch", **kw)
    allowed = allowed_mask(vis, mask, N, policy, visual_self)[:, [s % N for s in sel]]
    bad = torch.zeros(got.shape, dtype=torch.bool)
    bad[:, 2:] = allowed[:, None, :, 30]  # kv head 1 serves query heads 2, 3
    assert bad.any() and got[bad].isnan().all()
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got[~bad], clean[~bad])
    empty = (~allowed.any(-1))[:, None].expand_as(got)
    assert (got[empty] == 0).all()


# --------------------------------------------------------------------------- no N x N buffer

_FACTORIES = (
    "empty",
    "zeros",
    "ones",
    "full",
    "empty_like",
    "zeros_like",
    "ones_like",
    "full_like",
    "empty_strided",
    "arange",
    "cat",
    "stack",
    "where",
    "repeat_interleave",
    "tensor",
    "as_tensor",
)
_METHODS = (
    "new_empty",
    "new_zeros",
    "new_ones",
    "new_full",
    "new_tensor",
    "repeat",
    "expand",
    "contiguous",
    "clone",
    "to",
    "float",
)


class AllocationRecorder:
    """Largest numel returned by a wrapped allocation made from vskip_kernels code."""

    def __init__(self, monkeypatch):
        self.largest = 0
        self.calls = 0
        for name in _FACTORIES:
            monkeypatch.setattr(torch, name, self._wrap(getattr(torch, name)))
        for name in _METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name)))

    def _wrap(self, fn):
        def wrapper(*args, **kwargs):
            res = fn(*args, **kwargs)
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("vskip_kernels") and isinstance(res, torch.Tensor):
                self.calls += 1
                # An expand/view costs nothing: count the storage actually held.
                self.largest = max(self.largest, res.untyped_storage().nbytes() // max(1, res.element_size()))
            return res

        return wrapper


def long_inputs(n, policy_seed=0):
    g = torch.Generator().manual_seed(policy_seed)
    q = torch.randn(1, 2, n, 16, generator=g).half()
    k = torch.randn(1, 1, n, 16, generator=g).half()
    v = torch.randn(1, 1, n, 16, generator=g).half()
    vis = torch.zeros(1, n, dtype=torch.bool)
    vis[:, 8 : n - 24] = True  # one long image between a short prompt and a short question
    return q, k, v, vis


def test_recorder_sees_an_n_by_n_buffer(monkeypatch):
    """The recorder would catch one: the dense reference builds the N x N mask and scores."""
    n = 256
    q, k, v, vis = long_inputs(n)
    rec = AllocationRecorder(monkeypatch)
    attention_ref(q, k, v, vis, policy="vskip")
    assert rec.largest >= n * n


@pytest.mark.parametrize("policy", ("vskip", "frozen"))
def test_triton_never_allocates_n_by_n(monkeypatch, policy):
    n = 1024 + 512 + 37
    q, k, v, vis = long_inputs(n)
    rec = AllocationRecorder(monkeypatch)
    out, mass, lse = modality_attention(
        q, k, v, vis, policy=policy, return_visual_mass=True, return_lse=True, backend="triton"
    )
    step = modality_attention(q[:, :, -1:], k, v, vis, policy=policy, backend="triton")  # decode path
    last = visual_attention_mass(q, k, vis, policy=policy, query_positions=[-1, 0, 600], backend="triton")
    monkeypatch.undo()
    assert rec.calls > 0 and rec.largest >= out.numel()  # the outputs themselves were seen
    assert rec.largest < n * n // 8, f"largest allocation {rec.largest} elements for N={n}"
    assert torch.isfinite(out).all() and torch.isfinite(step).all() and torch.isfinite(last).all()
