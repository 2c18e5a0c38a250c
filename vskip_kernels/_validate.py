"""Input checks shared by every public op: bad input fails here, with the argument named."""

from __future__ import annotations

import torch

from .kinds import POLICIES

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("auto", "triton", "torch")


def _shape(t) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_policy(policy) -> None:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_mask_inputs(is_visual, attention_mask, policy) -> None:
    check_policy(policy)
    if not isinstance(is_visual, torch.Tensor):
        raise TypeError(f"is_visual must be a bool tensor [B, Nk], got {type(is_visual).__name__}")
    if is_visual.dim() != 2:
        raise ValueError(f"is_visual must be [B, Nk], got shape {_shape(is_visual)}")
    if is_visual.dtype != torch.bool:
        raise TypeError(f"is_visual must have dtype torch.bool, got {is_visual.dtype}")
    if is_visual.shape[0] == 0 or is_visual.shape[1] == 0:
        raise ValueError(
            f"is_visual must be non-empty, got shape {_shape(is_visual)} (empty batch or zero-length sequence)"
        )
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a tensor [B, Nk] or None, got {type(attention_mask).__name__}")
        if attention_mask.shape != is_visual.shape:
            raise ValueError(
                f"attention_mask must be [B, Nk] = {_shape(is_visual)} (1 = token, 0 = padding), "
                f"got shape {_shape(attention_mask)}"
            )
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise TypeError(f"attention_mask must be a bool or integer tensor of 0/1, got {attention_mask.dtype}")
        if attention_mask.device != is_visual.device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but is_visual is on {is_visual.device}")


def check_qkv(q, k, v=None) -> None:
    """q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D]; v may be None (visual mass needs no values)."""
    names = (("q", q), ("k", k)) + ((("v", v),) if v is not None else ())
    for name, t in names:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {_shape(t)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    for name, t in names[1:]:
        if t.dtype != q.dtype:
            raise TypeError(f"q and {name} must share a dtype, got q {q.dtype} and {name} {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"q and {name} must be on the same device, got q on {q.device} and {name} on {t.device}")
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"{name} batch size {t.shape[0]} does not match q's {q.shape[0]}")
        if t.shape[3] != q.shape[3]:
            raise ValueError(f"head dim mismatch: q has D={q.shape[3]}, {name} has D={t.shape[3]}")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"k and v must have the same shape, got k {_shape(k)} and v {_shape(v)}")
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if b == 0:
        raise ValueError("empty batch: q has B=0")
    if nq == 0 or nk == 0:
        raise ValueError(f"zero-length sequence: q has Nq={nq}, k has Nk={nk}")
    if hq == 0 or q.shape[3] == 0:
        raise ValueError(f"q must have at least one head and a non-zero head dim, got shape {_shape(q)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"number of query heads ({hq}) must be divisible by number of key/value heads ({hkv})")
    if nq > nk:
        raise ValueError(
            f"q has Nq={nq} queries but k has only Nk={nk} keys; queries must be the last Nq of the Nk positions"
        )


def check_attention_inputs(q, k, v, is_visual, attention_mask, policy, softmax_scale, backend) -> None:
    check_qk_kinds(q, k, is_visual, attention_mask, policy, backend, v=v)
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive float or None, got {softmax_scale!r}")


def query_indices(query_positions, nq: int, device) -> torch.Tensor:
    """The chosen queries as a 1-D int64 tensor of indices in [0, nq): ``query_positions``
    (ints or a 1-D integer tensor, negatives counting from the end) or, when None, all."""
    if query_positions is None:
        return torch.arange(nq, device=device)
    idx = torch.as_tensor(query_positions, device=device)
    if idx.dim() == 0:
        idx = idx[None]
    if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.numel() == 0:
        raise ValueError(
            f"query_positions must be a non-empty 1-D list of integer query indices, got {query_positions!r}"
        )
    if bool(((idx < -nq) | (idx >= nq)).any()):
        raise ValueError(
            f"query_positions must be in [-{nq}, {nq}) (indices into the Nq={nq} queries), got {idx.tolist()}"
        )
    return torch.remainder(idx.long(), nq)


def check_qk_kinds(q, k, is_visual, attention_mask, policy, backend, v=None) -> None:
    """q [B, Hq, Nq, D], k (and v, for attention) [B, Hkv, Nk, D], is_visual [B, Nk] on q's
    device, the mask, policy and backend names: what every public op checks (visual mass and
    received attention read no values)."""
    check_qkv(q, k, v)
    check_mask_inputs(is_visual, attention_mask, policy)
    check_backend(backend)
    b, nk = q.shape[0], k.shape[2]
    if tuple(is_visual.shape) != (b, nk):
        raise ValueError(f"is_visual must be [B, Nk] = [{b}, {nk}], got shape {_shape(is_visual)}")
    if is_visual.device != q.device:
        raise ValueError(f"is_visual is on {is_visual.device} but q is on {q.device}")
