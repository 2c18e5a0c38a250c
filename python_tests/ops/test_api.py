"""Public API: input errors, return shapes, varlen, torch.compile and the custom ops."""

import pytest
import torch

import vskip_kernels
from vskip_kernels import modality_attention, modality_attention_varlen, received_attention, visual_attention_mass
from vskip_kernels.reference import attention_ref


def inputs(b=2, hq=4, hkv=2, nq=24, nk=24, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    vis = torch.zeros(b, nk, dtype=torch.bool)
    vis[:, 3:15] = True
    return q, k, v, vis


def attn(q, k, v, vis, **kw):
    kw.setdefault("backend", "torch")
    return modality_attention(q, k, v, vis, **kw)


BAD_INPUTS = [
    ("is_visual 1-D", lambda q, k, v, vis: attn(q, k, v, vis[0]), ValueError, r"is_visual must be \[B, Nk\]"),
    (
        "is_visual wrong Nk",
        lambda q, k, v, vis: attn(q, k, v, vis[:, :-1]),
        ValueError,
        r"is_visual must be \[B, Nk\] = \[2, 24\]",
    ),
    (
        "is_visual not bool",
        lambda q, k, v, vis: attn(q, k, v, vis.int()),
        TypeError,
        "is_visual must have dtype torch.bool",
    ),
    (
        "mask shape",
        lambda q, k, v, vis: attn(q, k, v, vis, attention_mask=torch.ones(2, 23)),
        ValueError,
        r"attention_mask must be \[B, Nk\]",
    ),
    (
        "mask float",
        lambda q, k, v, vis: attn(q, k, v, vis, attention_mask=torch.ones(2, 24)),
        TypeError,
        "attention_mask must be a bool or integer",
    ),
    ("Hq % Hkv", lambda q, k, v, vis: attn(q[:, :3], k, v, vis), ValueError, r"query heads \(3\) must be divisible"),
    ("head dim", lambda q, k, v, vis: attn(q[..., :32], k, v, vis), ValueError, "head dim mismatch"),
    ("dtype", lambda q, k, v, vis: attn(q.half(), k, v, vis), TypeError, "q and k must share a dtype"),
    (
        "int dtype",
        lambda q, k, v, vis: attn(q.int(), k.int(), v.int(), vis),
        TypeError,
        "q must be float16, bfloat16 or float32",
    ),
    ("device", lambda q, k, v, vis: attn(q, k.to("meta"), v, vis), ValueError, "same device"),
    ("is_visual device", lambda q, k, v, vis: attn(q, k, v, vis.to("meta")), ValueError, "is_visual is on meta"),
    ("3-D q", lambda q, k, v, vis: attn(q[0], k, v, vis), ValueError, r"q must be 4-D \[B, H, N, D\]"),
    ("k/v shape", lambda q, k, v, vis: attn(q, k, v[:, :1], vis), ValueError, "k and v must have the same shape"),
    ("batch", lambda q, k, v, vis: attn(q[:1], k, v, vis), ValueError, "k batch size 2 does not match q's 1"),
    ("policy", lambda q, k, v, vis: attn(q, k, v, vis, policy="skip"), ValueError, "policy must be one of"),
    ("backend", lambda q, k, v, vis: attn(q, k, v, vis, backend="cuda"), ValueError, "backend must be one of"),
    (
        "scale",
        lambda q, k, v, vis: attn(q, k, v, vis, softmax_scale=-1.0),
        ValueError,
        "softmax_scale must be a positive",
    ),
    (
        "Nq > Nk",
        lambda q, k, v, vis: attn(torch.cat([q, q], 2), k, v, vis),
        ValueError,
        "Nq=48 queries but k has only Nk=24",
    ),
    ("empty batch", lambda q, k, v, vis: attn(q[:0], k[:0], v[:0], vis[:0]), ValueError, "empty batch"),
    (
        "zero-length",
        lambda q, k, v, vis: attn(q[:, :, :0], k[:, :, :0], v[:, :, :0], vis[:, :0]),
        ValueError,
        "zero-length sequence",
    ),
    ("not a tensor", lambda q, k, v, vis: attn(q.tolist(), k, v, vis), TypeError, "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("call, exc, match", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call(*inputs())


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(query_positions=[24]), ValueError, r"query_positions must be in \[-24, 24\)"),
        (dict(query_positions=[]), ValueError, "query_positions must be a non-empty"),
        (dict(query_positions=[0.5]), ValueError, "query_positions must be a non-empty 1-D list of integer"),
        (dict(policy="nope"), ValueError, "policy must be one of"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ],
)
def test_visual_mass_bad_inputs(kw, exc, match):
    q, k, _, vis = inputs()
    with pytest.raises(exc, match=match):
        visual_attention_mass(q, k, vis, **kw)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    q, k, v, vis = inputs()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors.*TRITON_INTERPRET=1"):
        modality_attention(q, k, v, vis, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        visual_attention_mass(q, k, vis, backend="triton")


def test_auto_backend_on_cpu_is_torch():
    q, k, v, vis = inputs()
    assert torch.equal(modality_attention(q, k, v, vis), attn(q, k, v, vis))


def test_return_tuple_order_and_shapes():
    q, k, v, vis = inputs(nq=10)
    out = attn(q, k, v, vis)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape and out.dtype == q.dtype
    full = attn(q, k, v, vis, return_visual_mass=True, return_lse=True)
    assert isinstance(full, tuple) and len(full) == 3
    ref = attention_ref(q, k, v, vis)
    for got, want in zip(full, ref):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    mass_only = attn(q, k, v, vis, return_visual_mass=True)
    lse_only = attn(q, k, v, vis, return_lse=True)
    assert len(mass_only) == 2 and torch.equal(mass_only[1], full[1])
    assert len(lse_only) == 2 and torch.equal(lse_only[1], full[2])
    assert torch.equal(out, full[0])


def packed(lens_q, lens_k, hq=4, hkv=2, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, hq, d, generator=g)
    k = torch.randn(tk, hkv, d, generator=g)
    v = torch.randn(tk, hkv, d, generator=g)
    vis = torch.rand(tk, generator=g) < 0.6
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, vis, cu(lens_q), cu(lens_k)


@pytest.mark.parametrize("policy", ("dense", "vskip", "frozen"))
def test_varlen_matches_per_sequence_calls(policy):
    lens_q, lens_k = [5, 17, 1, 30], [21, 17, 9, 44]
    q, k, v, vis, cq, ck = packed(lens_q, lens_k)
    out, mass, lse = modality_attention_varlen(
        q,
        k,
        v,
        cq,
        ck,
        max(lens_q),
        max(lens_k),
        vis,
        policy=policy,
        return_visual_mass=True,
        return_lse=True,
        backend="torch",
    )
    assert out.shape == q.shape and mass.shape == lse.shape == q.shape[:2]
    for i in range(len(lens_q)):
        qs, ks = slice(int(cq[i]), int(cq[i + 1])), slice(int(ck[i]), int(ck[i + 1]))
        to4 = lambda t: t.transpose(0, 1)[None]
        o, m, l = attn(
            to4(q[qs]), to4(k[ks]), to4(v[ks]), vis[ks][None], policy=policy, return_visual_mass=True, return_lse=True
        )
        torch.testing.assert_close(out[qs], o[0].transpose(0, 1), atol=2e-6, rtol=0)
        torch.testing.assert_close(mass[qs], m[0].transpose(0, 1), atol=2e-6, rtol=0)
        torch.testing.assert_close(lse[qs], l[0].transpose(0, 1), atol=4e-6, rtol=0)


def test_varlen_zero_length_query_sequence():
    lens_q, lens_k = [4, 0, 6], [10, 8, 6]
    q, k, v, vis, cq, ck = packed(lens_q, lens_k)
    out = modality_attention_varlen(q, k, v, cq, ck, 6, 10, vis, backend="torch")
    assert out.shape == q.shape
    for i in (0, 2):
        qs, ks = slice(int(cq[i]), int(cq[i + 1])), slice(int(ck[i]), int(ck[i + 1]))
        o = attn(q[qs].transpose(0, 1)[None], k[ks].transpose(0, 1)[None], v[ks].transpose(0, 1)[None], vis[ks][None])
        torch.testing.assert_close(out[qs], o[0].transpose(0, 1), atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda cq, ck: (cq.long(), ck), "cu_seqlens_q must be a 1-D int32 tensor"),
        (lambda cq, ck: (cq, ck[:-1]), "cu_seqlens_k has 2 sequences, cu_seqlens_q has 3"),
        (lambda cq, ck: (cq + 1, ck), "cu_seqlens_q must start at 0"),
        (lambda cq, ck: (cq, torch.tensor([0, 12, 8, 24], dtype=torch.int32)), "non-decreasing"),
        (
            lambda cq, ck: (torch.tensor([0, 9, 9, 10], dtype=torch.int32), ck),
            "sequence 0 has 9 queries but only 8 keys",
        ),
    ],
    ids=["q_int64", "k_fewer_sequences", "q_not_from_0", "k_decreasing", "more_queries_than_keys"],
)
def test_varlen_bad_cu_seqlens(mutate, match):
    q, k, v, vis, cq, ck = packed([3, 4, 3], [8, 8, 8])
    cq, ck = mutate(cq, ck)
    with pytest.raises(ValueError, match=match):
        modality_attention_varlen(q, k, v, cq, ck, 8, 8, vis, backend="torch")


def test_varlen_bad_max_seqlen_and_shapes():
    q, k, v, vis, cq, ck = packed([3, 4], [8, 8])
    with pytest.raises(ValueError, match="max_seqlen_q/max_seqlen_k"):
        modality_attention_varlen(q, k, v, cq, ck, 2, 8, vis, backend="torch")
    with pytest.raises(ValueError, match=r"q must be packed \[total, H, D\]"):
        modality_attention_varlen(q[None], k, v, cq, ck, 4, 8, vis, backend="torch")
    with pytest.raises(ValueError, match=r"is_visual must be a bool tensor \[total_k\]"):
        modality_attention_varlen(q, k, v, cq, ck, 4, 8, vis[:-1], backend="torch")


def test_torch_compile_fullgraph_matches_eager():
    q, k, v, vis = inputs(nq=16)
    mask = torch.ones(vis.shape, dtype=torch.int64)
    mask[1, :4] = 0

    def f(q, k, v, vis, mask):
        out, lse = modality_attention(
            q, k, v, vis, policy="vskip", attention_mask=mask, return_lse=True, backend="torch"
        )
        plain = modality_attention(q, k, v, vis, policy="frozen", attention_mask=mask, backend="torch")
        mass = visual_attention_mass(q, k, vis, attention_mask=mask, query_positions=[-1], backend="torch")
        rank = received_attention(
            q, k, vis, lse=lse, policy="vskip", attention_mask=mask, query_positions=[-1], backend="torch"
        )
        return out * 2 + plain, lse, mass, rank

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(q, k, v, vis, mask), f(q, k, v, vis, mask)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_opcheck_custom_ops():
    from vskip_kernels.ops.attention import _modality_attention_op
    from vskip_kernels.ops.received_attention import _received_op
    from vskip_kernels.ops.visual_mass import _visual_mass_op
    from vskip_kernels.reference import token_kind

    q, k, v, vis = inputs(nq=8, nk=12, d=32)
    vis = vis[:, :12]
    kind = token_kind(vis)
    none = kind.new_empty(0, dtype=torch.int32)
    for want_mass, want_lse in ((True, True), (False, False)):
        torch.library.opcheck(
            _modality_attention_op,
            (q, k, v, kind, none, none, none, none, 1, True, 0.125, 0, 0, want_mass, want_lse, "torch"),
        )
    q_pos = torch.tensor([4, 11], dtype=torch.int32)
    torch.library.opcheck(_visual_mass_op, (q[:, :, :2].contiguous(), k, kind, q_pos, 0, True, 0.125, "torch"))
    lse = torch.randn(q.shape[0], q.shape[1], 2)
    torch.library.opcheck(_received_op, (q[:, :, :2].contiguous(), k, kind, q_pos, lse, 1, True, 0.125, "torch"))


def test_public_names():
    for name in (
        "modality_attention",
        "modality_attention_varlen",
        "visual_attention_mass",
        "received_attention",
        "plan_schedule",
        "Schedule",
        "SkipPlan",
    ):
        assert hasattr(vskip_kernels, name)
