"""vLLM v1 attention backend running the plan's policies on vLLM's paged KV cache.

The backend keeps vLLM's CPU backend's cache *shape* ([num_blocks, Hkv, block_size, 2 * D],
which the CPU worker allocates and zeroes) and its metadata builder (query_start_loc,
seq_lens, block_table, slot_mapping), but owns what lives inside a block: it writes K and V
itself, plainly, in the two halves of the ``[num_blocks, Hkv, 2 * block_size, D]`` view (K
rows first), and reads them back with the paged kernels of ``vskip_kernels.ops``
(PyTorch on CPU, Triton on CUDA). vLLM's native CPU kernels, whose blocked layout depends
on the instruction set, never touch this cache.

Which layer runs which policy, and which cache slots hold visual tokens, come from the
``ModelState`` the plugin attaches to each decoder layer's ``Attention`` module. Layers of
other kinds (encoder attention) and modules without a state fall back to the CPU backend.
"""

from __future__ import annotations

from typing import Any

import torch

from . import compat

# vLLM's CPU backend classes, found at import time (their module moves between releases):
# static typing cannot see through that, so they are Any to mypy.
_Base: Any
_BaseImpl: Any
_BaseBuilder: Any
_Base, _BaseImpl, _BaseBuilder = compat.cpu_backend_classes()


def split_kv_cache(kv_cache: torch.Tensor):
    """(key_cache, value_cache), each a [num_blocks, Hkv, block_size, D] view of vLLM's CPU cache tensor."""
    nb, hkv, bs, two_d = kv_cache.shape
    view = kv_cache.view(nb, hkv, 2 * bs, two_d // 2)
    return view[:, :, :bs], view[:, :, bs:]


def write_kv(key, value, kv_cache, slot_mapping) -> None:
    """Scatter the step's K/V [T, Hkv, D] into their slots (negative slots: padding, skipped)."""
    kc, vc = split_kv_cache(kv_cache)
    bs = kc.shape[2]
    n = min(key.shape[0], slot_mapping.shape[0])
    slots = slot_mapping[:n].long()
    ok = slots >= 0
    if not bool(ok.all()):
        slots, key, value = slots[ok], key[:n][ok], value[:n][ok]
    else:
        key, value = key[:n], value[:n]
    blk, off = slots // bs, slots % bs
    kc[blk, :, off] = key.to(kc.dtype)
    vc[blk, :, off] = value.to(vc.dtype)


def paged_attention(q, key_cache, value_cache, md, slot_kinds, policy, scale, out, row_live=None):
    """Dispatch to the paged kernel for q's device: Triton on CUDA, PyTorch elsewhere.
    row_live (bool [T], optional): rows to compute; the others come out as zeros."""
    num_reqs = md.query_start_loc.shape[0] - 1
    args = (
        q,
        key_cache,
        value_cache,
        md.block_table[:num_reqs],
        md.seq_lens[:num_reqs],
        md.query_start_loc,
        slot_kinds,
    )
    if q.is_cuda:
        from ..ops.triton.paged import paged_attention_triton

        res = paged_attention_triton(*args, policy=policy, softmax_scale=scale, num_reqs=num_reqs)
        if row_live is not None:
            res = res * row_live[:, None, None].to(res.dtype)
        out.copy_(res)
        return out
    from ..ops.pytorch.paged import paged_attention_torch

    return paged_attention_torch(
        *args, policy=policy, softmax_scale=scale, num_reqs=num_reqs, out=out, row_live=row_live
    )


class VskipAttentionImpl(_BaseImpl):
    def _vskip(self, layer):
        st = getattr(layer, "_vskip_state", None)
        if st is None or self.attn_type not in compat.decoder_attn_types():
            return None
        return st

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if self._vskip(layer) is None:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if self.is_fp8_kv_cache:
            raise NotImplementedError("the vskip plugin stores K/V as they come; fp8 KV caches are not supported")
        write_kv(key, value, kv_cache, slot_mapping)

    def forward(
        self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None
    ):
        st = self._vskip(layer)
        if st is None or attn_metadata is None:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by the vskip backend")
        if (
            self.sliding_window not in (-1, None)
            or self.alibi_slopes is not None
            or self.logits_soft_cap
            or self.sinks is not None
        ):
            raise NotImplementedError(
                "the vskip backend supports plain causal attention: no sliding window, "
                "ALiBi, soft-capping or attention sinks"
            )
        n = attn_metadata.num_actual_tokens
        key_cache, value_cache = split_kv_cache(kv_cache)
        num_slots = key_cache.shape[0] * key_cache.shape[2]
        slot_kinds = st.slot_kinds_for(kv_cache, num_slots)
        policy = layer._vskip_policy
        row_live = None
        step = st.step
        if step is not None and step.any_decode and layer._vskip_bypass:
            # mixed step in a decode-bypassed layer: the decode rows' results are dropped, skip them
            row_live = ~step.decode[:n]
        paged_attention(
            query[:n], key_cache, value_cache, attn_metadata, slot_kinds, policy, self.scale, output[:n], row_live
        )
        return output


class VskipAttentionBackend(_Base):
    """vLLM's CPU backend with the vskip impl (registered in place of CPU_ATTN when a plan is given)."""

    @staticmethod
    def get_impl_cls():
        return VskipAttentionImpl

    @staticmethod
    def get_builder_cls():
        return _BaseBuilder
