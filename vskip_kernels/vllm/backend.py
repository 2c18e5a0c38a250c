"""vLLM v1 attention backend running the plan's policies on vLLM's paged KV cache.

One backend for vLLM's CPU and CUDA platforms: the same backend, metadata, builder and impl
classes, and the same KV layout; only how the platform is told to use it differs (``compat``:
in place of ``CPU_ATTN`` on CPU, as vLLM's ``CUSTOM`` backend on CUDA).

* **KV layout**: vLLM 0.32 allocates every layer's cache as a ``[num_blocks, Hkv, block_size,
  2 * D]`` view (its ``[B, H, N, C]`` logical page, whose physical axis order is one of the
  layouts the backends declare). The content axis holds K then V: ``key_cache = kv[..., :D]``,
  ``value_cache = kv[..., D:]``, each ``[num_blocks, Hkv, block_size, D]`` with a unit last
  stride, whatever the physical order. K/V are written here (``write_kv``) and read by the
  paged kernels of ``vskip_kernels.ops`` (``paged_attention_torch`` or
  ``paged_attention_triton``), which address blocks through strides: head-major (``LBHNC``) is
  preferred, token-major (``LBNHC``) accepted. vLLM's own attention kernels never touch it.
* **Metadata**: ``VskipAttentionMetadata`` carries what the kernels need from vLLM's
  ``CommonAttentionMetadata``: ``query_start_loc``, ``seq_lens``, ``block_table``,
  ``slot_mapping``, ``num_actual_tokens``, ``num_reqs`` (and the maxima, for logs).
* **CUDA graphs**: the builder declares ``AttentionCGSupport.NEVER``, so vLLM never captures
  this attention in a full CUDA graph (it runs eagerly between piecewise graphs; see
  ``compat``'s docstring). The kernels may synchronise with the host.
* **Kernel**: ``ModelState.kernel`` (``additional_config["vskip_backend"]``, resolved at
  start-up) picks PyTorch or Triton; the device of the tensors does not.

Which layer runs which policy, and which cache slots hold visual tokens, come from the
``ModelState`` the plugin attaches to each decoder layer's ``Attention`` module. An
``Attention`` module without a state (none in the supported models) runs plain causal
attention with the same kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..kinds import KIND_TEXT
from ..plan import PlanError
from . import compat

# vLLM's abstract base classes, found through compat (their module moves between releases):
# static typing cannot see through that, so they are Any to mypy.
_Backend: Any
_Impl: Any
_Builder: Any
_CGSupport: Any
_Backend, _Impl, _Builder, _CGSupport = compat.attention_base_classes()

# Cache block sizes the paged Triton kernel takes (one key tile per block). vLLM splits a
# larger manager block (e.g. the CPU platform's default 128) into kernel blocks of these.
KERNEL_BLOCK_SIZES = (16, 32, 64)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_SIZES = (16, 256)  # inclusive range of head sizes the kernels take


def split_kv_cache(kv_cache: torch.Tensor):
    """(key_cache, value_cache), each a [num_blocks, Hkv, block_size, D] view of the layer's
    [num_blocks, Hkv, block_size, 2 * D] cache tensor (K in the first half of the content axis)."""
    d = kv_cache.shape[-1] // 2
    return kv_cache[..., :d], kv_cache[..., d:]


def write_kv(key, value, kv_cache, slot_mapping) -> None:
    """Scatter the step's K/V [T, Hkv, D] into their slots (negative slots: padding, skipped).
    Synchronises with the host: runs eagerly (vLLM 0.32 keeps the KV-cache update out of its graphs)."""
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


def paged_attention(q, key_cache, value_cache, md, slot_kinds, policy, scale, out, row_live=None, kernel="torch"):
    """Run the paged kernel ``kernel`` ("torch" or "triton") into ``out`` (written in place).
    row_live (bool [T], optional): rows to compute; the others come out as zeros."""
    num_reqs = md.num_reqs
    args = (
        q,
        key_cache,
        value_cache,
        md.block_table[:num_reqs],
        md.seq_lens[:num_reqs],
        md.query_start_loc,
        slot_kinds,
    )
    if kernel == "triton":
        from ..ops.triton.paged import paged_attention_triton

        res = paged_attention_triton(*args, policy=policy, softmax_scale=scale, num_reqs=num_reqs)
        if row_live is not None:
            res = res * row_live[:, None, None].to(res.dtype)
        out.copy_(res)
        return out
    if kernel != "torch":
        raise ValueError(f"kernel must be 'torch' or 'triton', got {kernel!r}")
    from ..ops.pytorch.paged import paged_attention_torch

    return paged_attention_torch(
        *args, policy=policy, softmax_scale=scale, num_reqs=num_reqs, out=out, row_live=row_live
    )


@dataclass
class VskipAttentionMetadata:
    num_actual_tokens: int  # tokens of the step, padding excluded
    num_reqs: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1]
    seq_lens: torch.Tensor  # int32 [num_reqs]: keys of each request, this step's included
    block_table: torch.Tensor  # int32 [num_reqs, max_blocks] (kernel blocks)
    slot_mapping: torch.Tensor  # int64 [num_tokens]: cache slot of each token (-1: padding)


class VskipAttentionMetadataBuilder(_Builder):
    # Never captured in a full CUDA graph: the kernels read host-side lengths, and the policy
    # of a layer depends on per-step state read in Python.
    _cudagraph_support: ClassVar[Any] = _CGSupport.NEVER
    # reorder_batch_threshold stays None: the kernels take decode and prefill rows in any order

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False) -> VskipAttentionMetadata:
        cm = common_attn_metadata
        if cm.causal is not True:
            raise NotImplementedError("the vskip backend runs causal decoder attention only")
        return VskipAttentionMetadata(
            num_actual_tokens=int(cm.num_actual_tokens),
            num_reqs=int(cm.num_reqs),
            max_query_len=int(cm.max_query_len),
            max_seq_len=int(cm.max_seq_len),
            query_start_loc=cm.query_start_loc,
            seq_lens=cm.seq_lens,
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping,
        )


class VskipAttentionImpl(_Impl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = "decoder",
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **extra: Any,
    ) -> None:
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.alibi_slopes = alibi_slopes
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        self.sinks = sinks
        extra_set = sorted(k for k, v in extra.items() if v not in (None, False, -1))
        unsupported = [
            what
            for what, bad in (
                (f"attention type {attn_type!r}", attn_type not in compat.decoder_attn_types()),
                ("a sliding window", sliding_window not in (None, -1)),
                ("ALiBi", alibi_slopes is not None),
                ("logits soft-capping", bool(logits_soft_cap)),
                ("attention sinks", sinks is not None),
                (f"kv_cache_dtype={kv_cache_dtype!r}", kv_cache_dtype != "auto"),
                (f"the arguments {extra_set}", bool(extra_set)),
            )
            if bad
        ]
        if unsupported:
            raise PlanError(
                "the vskip attention backend runs plain causal decoder attention with K/V in the model "
                f"dtype; this layer asks for {', '.join(unsupported)}"
            )
        self._all_text: torch.Tensor | None = None

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        write_kv(key, value, kv_cache, slot_mapping)

    def _plain_kinds(self, num_slots: int, device) -> torch.Tensor:
        t = self._all_text
        if t is None or t.numel() < num_slots or t.device != device:
            t = self._all_text = torch.full((num_slots,), KIND_TEXT, dtype=torch.int8, device=device)
        return t

    def forward(
        self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None
    ):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by the vskip backend")
        if attn_metadata is None:  # warm-up / profiling run without metadata
            return output
        n = attn_metadata.num_actual_tokens
        key_cache, value_cache = split_kv_cache(kv_cache)
        num_slots = key_cache.shape[0] * key_cache.shape[2]
        st = getattr(layer, "_vskip_state", None)
        row_live = None
        if st is None:  # an Attention module the plan does not cover: plain causal attention
            policy, kernel = "dense", ("triton" if query.is_cuda else "torch")
            slot_kinds = self._plain_kinds(num_slots, kv_cache.device)
        else:
            policy, kernel = layer._vskip_policy, st.kernel
            slot_kinds = st.slot_kinds_for(kv_cache, num_slots)
            step = st.step
            if step is not None and step.any_decode and layer._vskip_bypass:
                # mixed step in a decode-bypassed layer: the decode rows' results are dropped, skip them
                row_live = ~step.decode[:n]
            st.kernel_calls[kernel] += 1
        q, out = query[:n], output[:n]
        paged_attention(q, key_cache, value_cache, attn_metadata, slot_kinds, policy, self.scale, out, row_live, kernel)
        return output


class VskipAttentionBackend(_Backend):
    """The vskip attention backend (registered by ``compat.use_backend`` when a plan is given)."""

    forward_includes_kv_cache_update: bool = False  # vLLM calls do_kv_cache_update, then forward
    supported_dtypes: ClassVar[list[torch.dtype]] = list(SUPPORTED_DTYPES)
    supported_kv_cache_dtypes: ClassVar[list[Any]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        # vLLM maps the name back to its backend enum; CUSTOM is the member for out-of-tree
        # backends (on CPU the platform still asks for CPU_ATTN, whose path points here)
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return VskipAttentionImpl

    @staticmethod
    def get_builder_cls():
        return VskipAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[Any]:
        return list(KERNEL_BLOCK_SIZES)

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return HEAD_SIZES[0] <= head_size <= HEAD_SIZES[1]

    @classmethod
    def supported_kv_cache_layouts(cls):
        return compat.kv_cache_layouts()
