"""The one place that knows how transformers spells things, across the tested releases.

transformers renames keywords and moves internals between releases. Everything the
HF drop-in reads from transformers goes through this module: the name the KV cache is
passed under (``past_key_values`` up to 5.23, ``cache`` from 5.24, the old name kept as
a deprecation shim until 5.40), the cache an output carries, the length a cache layer
holds, and what counts as a decode step. Nothing else in the package names
``past_key_values``.

``TESTED`` is the range CI runs the HF suite against. A model patched under a release
outside it gets one warning naming the range; a release that removes something this
module needs gets an error naming the release and the feature, never a wrong answer.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch

# Oldest and newest transformers releases the HF-facing tests run against in CI.
TESTED = ("5.17.0", "5.25.0")

# Cache keyword names, newest first. Models take one of them; generate() and callers of
# older code may still pass the other (transformers renames it inside forward, after
# our hooks have seen the call's kwargs).
CACHE_NAMES = ("cache", "past_key_values")


class TransformersCompatError(RuntimeError):
    """transformers changed something the compat layer cannot absorb."""


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def _release(v: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a version string; pre/dev/local suffixes ignored."""
    from packaging.version import Version

    r = (*Version(v).release, 0, 0, 0)
    return r[0], r[1], r[2]


def in_tested_range(version: str | None = None) -> bool:
    v = _release(version or transformers_version())
    lo, hi = _release(TESTED[0]), _release(TESTED[1])
    # any patch release of the newest tested minor counts as tested
    return lo <= v and v[:2] <= hi[:2]


def tested_range_text() -> str:
    lo, hi = TESTED
    return f"transformers {lo} to {'.'.join(hi.split('.')[:2])}.x"


@functools.cache
def warn_if_untested(version: str | None = None) -> bool:
    """Warn once per process (per version) when transformers is outside the tested range."""
    version = version or transformers_version()
    if in_tested_range(version):
        return False
    warnings.warn(
        f"vskip_kernels' Hugging Face integration is tested with {tested_range_text()}; "
        f"this is transformers {version}. Patched models may fail or, if transformers changed an "
        "internal the integration relies on, behave differently; please report it.",
        RuntimeWarning,
        stacklevel=3,
    )
    return True


# -- the cache keyword ------------------------------------------------------------------
def cache_param_name(fn) -> str | None:
    """Which cache keyword ``fn`` (a forward, possibly wrapped by transformers' decorators) declares."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    return next((n for n in CACHE_NAMES if n in params), None)


@functools.cache
def model_cache_kwarg() -> str:
    """The keyword this transformers release's models take the KV cache under."""
    from transformers.models.llama.modeling_llama import LlamaModel

    name = cache_param_name(LlamaModel.forward)
    if name is None:
        raise TransformersCompatError(
            f"transformers {transformers_version()}: LlamaModel.forward takes the KV cache under none of "
            f"{CACHE_NAMES}; vskip_kernels' Hugging Face integration does not know this release "
            f"(tested: {tested_range_text()})"
        )
    return name


def cache_kwargs(cache) -> dict:
    """``{name: cache}`` to pass a cache to a model (forward or generate) of this release."""
    return {model_cache_kwarg(): cache}


def get_cache(kwargs: dict):
    """The cache a forward call was given, under either name (None when there is none)."""
    found = [(n, kwargs[n]) for n in CACHE_NAMES if kwargs.get(n) is not None]
    if len(found) > 1 and found[0][1] is not found[1][1]:
        raise ValueError(f"got two different caches, as `{found[0][0]}` and `{found[1][0]}`; pass one")
    return found[0][1] if found else None


def set_cache(kwargs: dict, cache) -> dict:
    """kwargs with the cache under the name(s) it came in, replaced by ``cache``."""
    out = dict(kwargs)
    for n in CACHE_NAMES:
        if n in out:
            out[n] = cache
    return out


def output_cache(output):
    """The cache a model output carries (``.cache`` from 5.24, ``.past_key_values`` before).

    Reads only the field the output really has: asking a 5.24 output for
    ``past_key_values`` works but logs a deprecation warning."""
    if output is None:
        return None
    if isinstance(output, dict):  # ModelOutput: its stored keys are the release's own names
        keys = output.keys()
        return next((output[n] for n in CACHE_NAMES if n in keys and output[n] is not None), None)
    fields = getattr(output, "__dict__", {})
    return next((fields[n] for n in CACHE_NAMES if fields.get(n) is not None), None)


# -- cache contents -----------------------------------------------------------------------
def is_cache(obj) -> bool:
    """A transformers ``Cache`` with per-layer storage (what the patch knows how to read)."""
    return obj is not None and hasattr(obj, "layers") and hasattr(obj, "get_seq_length")


def cache_layer_length(cache, layer: int) -> int:
    """Positions layer ``layer`` holds, read from the layer itself: never through the Cache
    methods the patch redirects (a decode-bypassed layer's own length stops growing)."""
    if cache is None:
        return 0
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TransformersCompatError(
            f"transformers {transformers_version()}: {type(cache).__name__} has no per-layer `.layers`; "
            f"vskip_kernels needs the layered Cache API of {tested_range_text()}"
        )
    if layer >= len(layers):
        return 0
    n = layers[layer].get_seq_length()
    return int(n.item()) if isinstance(n, torch.Tensor) else int(n)


def past_length(cache, layer: int, tracked: int | None) -> int:
    """Positions cached before a call.

    Eager calls read the cache layer (authoritative; the caller checks it against what it
    tracked). While torch.compile traces a call, ``tracked`` (the positions the patch has
    seen, a host int) stands in: reading a StaticCache's length is a device-to-host sync,
    a graph break in every decode step. Compiled steps follow an eager prefill, which set
    ``tracked`` from the cache itself.
    """
    if cache is None:
        return 0
    if tracked is not None and torch.compiler.is_compiling():
        return tracked
    return cache_layer_length(cache, layer)


def is_decode_step(hidden_states: torch.Tensor, cache, layer: int) -> bool:
    """One new position per sequence on top of a non-empty cache of this layer.

    A one-token call on an empty cache is a (tiny) prefill, not a decode step.
    """
    return hidden_states.shape[1] == 1 and cache is not None and cache_layer_length(cache, layer) > 0


# Cache methods transformers sizes masks and positions with; the patch redirects them
# away from decode-bypassed layers (hf/cache.py), so they must exist under these names.
MASK_SIZING_METHODS = ("get_seq_length", "get_mask_sizes", "get_query_offset", "reorder_cache")


def check_cache_methods(cache) -> None:
    missing = [m for m in MASK_SIZING_METHODS if not callable(getattr(type(cache), m, None))]
    if missing:
        raise TransformersCompatError(
            f"transformers {transformers_version()}: {type(cache).__name__} lacks {missing}, which decode-bypassed "
            f"layers need redirected; vskip_kernels' Hugging Face integration is tested with {tested_range_text()}"
        )


# -- attention and mask interfaces ----------------------------------------------------------
def register_attention(name: str, attention_fn, mask_fn) -> None:
    """Make ``name`` a valid ``attn_implementation`` with its attention and mask functions."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise TransformersCompatError(
            f"transformers {transformers_version()} has no AttentionInterface/AttentionMaskInterface ({e}); "
            f"vskip_kernels' Hugging Face integration is tested with {tested_range_text()}"
        ) from e
    AttentionInterface.register(name, attention_fn)
    AttentionMaskInterface.register(name, mask_fn)


def is_plain_causal(mask_function) -> bool:
    """True when a mask-interface call asks for the plain causal pattern (no window, chunks, packing)."""
    from transformers.masking_utils import causal_mask_function

    return mask_function is None or mask_function is causal_mask_function


def padding_mask_2d(attention_mask: torch.Tensor, kv_length: int, kv_offset: int) -> torch.Tensor:
    """The 2-D bool padding mask over keys [kv_offset, kv_offset + kv_length), padded with 0s
    where the cache is longer than the mask (static-cache slots not filled yet)."""
    from transformers.masking_utils import prepare_padding_mask

    mask = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if mask is None:  # only for attention_mask None, which the caller has ruled out
        raise TransformersCompatError("prepare_padding_mask returned None for a given attention_mask")
    return mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)


# Keywords VLM forwards take image or video inputs under (LLaVA*, Qwen2-VL, Qwen2.5-VL).
VISUAL_INPUT_KWARGS = ("pixel_values", "pixel_values_videos", "image_embeds", "video_embeds")


def has_visual_inputs(kwargs: dict) -> bool:
    """Whether a forward call carries image/video inputs whose features fill placeholder positions."""
    return any(kwargs.get(k) is not None for k in VISUAL_INPUT_KWARGS)


# -- decoder-layer keywords of a compacted (pruned) sequence -------------------------------
# Decoder layers of every supported family take the rotary tables as
# ``position_embeddings=(cos, sin)``, each [B or 1, N, head_dim] (Qwen2-VL's M-RoPE sections
# are merged by the rotary module before the loop), ``position_ids`` [B or 1, N] or None
# (the vskip attention does not read them), and the mask under ``attention_mask``.
def call_padding_mask(kwargs: dict, length: int) -> torch.Tensor | None:
    """The 2-D padding mask [B, length] a top-level call carries, or None.

    generate() with a StaticCache prepares the masks before calling the model and passes the
    mapping {layer type: mask}; under the "vskip" implementation each is our 2-D padding mask,
    as long as the cache. A 2-D mask may be longer for the same reason."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() != 2 or mask.shape[1] < length:
        raise ValueError(
            f"prune stages need the 2-D padding mask [B, >= {length}] (cached + new positions); got attention_mask "
            f"of shape {list(mask.shape)}"
        )
    return mask[:, :length].bool()


def gather_position_kwargs(kw: dict, rows: torch.Tensor) -> dict:
    """``position_embeddings`` and ``position_ids`` of a layer call, at rows [B, M] of the sequence."""
    b, n = rows.shape[0], None
    out: dict = {}
    pe = kw.get("position_embeddings")
    if pe is not None:
        if not isinstance(pe, (tuple, list)) or len(pe) != 2 or any(t.dim() != 3 for t in pe):
            raise TransformersCompatError(
                f"transformers {transformers_version()}: prune stages expect position_embeddings=(cos, sin), each "
                f"[B, N, head_dim]; got {type(pe).__name__} (tested: {tested_range_text()})"
            )
        n = pe[0].shape[1]
        out["position_embeddings"] = tuple(_gather_seq(t.expand(b, -1, -1), rows) for t in pe)
    pid = kw.get("position_ids")
    if isinstance(pid, torch.Tensor) and pid.dim() == 2 and (n is None or pid.shape[1] == n):
        out["position_ids"] = pid.expand(b, -1).gather(1, rows.to(pid.device))
    elif "position_ids" in kw:
        out["position_ids"] = None
    return out


def _gather_seq(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    rows = rows.to(t.device)
    return t.gather(1, rows[..., None].expand(*rows.shape, t.shape[2]))


def with_layer_mask(kw: dict, mask: torch.Tensor | None) -> dict:
    """A decoder layer's kwargs with the 2-D padding mask of its (compacted) keys."""
    return {**kw, "attention_mask": mask}


def kv_cache_bytes(cache) -> list[int]:
    """Per decoder layer, the bytes of keys and values a transformers cache holds for its filled
    positions (a StaticCache's unused slots are not counted)."""
    out = []
    for i, layer in enumerate(getattr(cache, "layers", ())):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor) or keys.dim() != 4:
            out.append(0)
            continue
        n = cache_layer_length(cache, i)
        per_pos = (keys[:, :, :1].numel() * keys.element_size()) + (values[:, :, :1].numel() * values.element_size())
        out.append(n * per_pos)
    return out
