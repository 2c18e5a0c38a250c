"""The ``"vskip"`` attention implementation and its mask function for transformers.

The attention function is registered in transformers' ``AttentionInterface``; the mask
function in ``AttentionMaskInterface``. Without the latter transformers would hand a
custom implementation no mask at all; ours returns the plain 2-D padding mask (padded
to the cache's key length), because the policy masks are built from token kinds by
the kernels, never as a dense 4-D tensor.
"""

from __future__ import annotations

from ..ops.attention import modality_attention
from ..ops.received_attention import received_attention
from ..ops.visual_mass import visual_attention_mass
from . import compat

ATTN_NAME = "vskip"


def _check_unsupported(dropout, sliding_window, softcap, kwargs) -> None:
    if dropout not in (None, 0, 0.0):
        raise ValueError(f"vskip attention has no attention dropout; got dropout={dropout} (call model.eval())")
    if sliding_window is not None:
        raise ValueError(
            f"vskip attention does not implement sliding-window attention (sliding_window={sliding_window})"
        )
    if softcap is not None:
        raise ValueError(f"vskip attention does not implement logit soft-capping (softcap={softcap})")
    for name in ("s_aux", "sinks", "attention_sinks", "head_mask"):
        if kwargs.get(name) is not None:
            raise ValueError(f"vskip attention does not support `{name}`")


def vskip_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, softcap=None, **kwargs
):
    """transformers attention-interface entry: q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] (full cache)."""
    state = getattr(module, "_vskip_state", None)
    if state is None or not state.active:
        raise RuntimeError(
            f"attn_implementation={ATTN_NAME!r} only works on models patched with vskip_kernels.hf.apply_skip_plan"
        )
    _check_unsupported(dropout, sliding_window, softcap, kwargs)
    layer = module._vskip_layer_idx
    policy = state.policy(layer)
    key, value, is_visual, mask = state.masks_for(query, key, value, attention_mask, layer)
    out = layer_attention(state, layer, query, key, value, is_visual, mask, policy, scaling)
    return out.transpose(1, 2).contiguous(), None


def layer_attention(state, layer: int, q, k, v, is_visual, mask, policy: str, scaling):
    """One patched layer's attention [B, Hq, Nq, D]; on the way, the layer's share of the
    plan's other work: the received-attention ranking a prune stage at ``layer + 1`` needs
    (from this layer's own probabilities, through the LSE the kernel returns), and the visual
    mass open recorders collect."""
    sched = state.schedule_for(is_visual, mask, q, policy, layer)
    common = dict(policy=policy, attention_mask=mask, softmax_scale=scaling, backend=state.backend)
    rank = state.prune.rank_for(layer)
    if rank is None:
        out = modality_attention(q, k, v, is_visual, schedule=sched, **common)
    else:
        out, lse = modality_attention(q, k, v, is_visual, schedule=sched, return_lse=True, **common)
        scores = received_attention(
            q, k, is_visual, lse=lse, query_positions=[-1] if rank == "last" else None, **common
        )
        state.prune.set_scores(layer, scores)
    if state.recorders:
        mass = visual_attention_mass(q, k, is_visual, query_positions=[-1], **common)
        state.record(layer, mass[:, :, 0])
    return out


def vskip_mask(
    batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None, **kwargs
):
    """transformers mask-interface entry: the 2-D boolean padding mask over the kv_length keys, or None."""
    if not compat.is_plain_causal(mask_function):
        raise ValueError(
            "vskip attention supports plain causal masks only; this model asked for a custom mask pattern "
            f"({getattr(mask_function, '__name__', mask_function)}: sliding window, chunked, packed sequences "
            "or bidirectional blocks)"
        )
    if attention_mask is None:
        return None
    return compat.padding_mask_2d(attention_mask, kv_length, kv_offset)


def register() -> None:
    """Idempotent: make ``"vskip"`` a valid attention implementation with its mask function."""
    compat.register_attention(ATTN_NAME, vskip_attention_forward, vskip_mask)
