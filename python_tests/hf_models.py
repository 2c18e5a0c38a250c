"""Tiny random models of the supported families and matching inputs, shared by tests.

No downloads: every model is built from a small config with random fp32 weights, in
eval mode. ``make_inputs`` lays out prompts as text, image placeholder runs and text,
left-padded to a common length, with exactly as many placeholder tokens as the
vision tower produces features for each image.
"""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 96
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
PAD_ID = 0
# Placeholder ids sit at the top of the vocabulary so random text never hits them.
IMAGE_ID = VOCAB - 2
VIDEO_ID = VOCAB - 1
VISION_START_ID = VOCAB - 3
VISION_END_ID = VOCAB - 4
TEXT_ID_RANGE = (1, VOCAB - 8)


def _text_kwargs(layers: int, head_dim: int):
    return dict(
        vocab_size=VOCAB,
        hidden_size=HEADS * head_dim,
        intermediate_size=2 * HEADS * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=512,
        pad_token_id=PAD_ID,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def _finish(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            # Larger than the default init so that attention patterns and therefore the
            # policies visibly change the logits (a near-uniform softmax would hide bugs).
            p.normal_(0.0, 0.3 if p.dim() > 1 else 0.1)
    return model.float().eval()


def _clip_vision(image_size=8, patch_size=4):
    return tf.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )


def tiny_llama(seed: int = 0, layers: int = 3, head_dim: int = 16):
    torch.manual_seed(seed)
    return _finish(tf.LlamaForCausalLM(tf.LlamaConfig(**_text_kwargs(layers, head_dim))), seed)


def tiny_qwen2(seed: int = 0, layers: int = 3, head_dim: int = 16):
    torch.manual_seed(seed)
    return _finish(tf.Qwen2ForCausalLM(tf.Qwen2Config(**_text_kwargs(layers, head_dim))), seed)


def tiny_llava(seed: int = 0, layers: int = 3, head_dim: int = 16):
    torch.manual_seed(seed)
    cfg = tf.LlavaConfig(
        vision_config=_clip_vision(),
        text_config=tf.LlamaConfig(**_text_kwargs(layers, head_dim)),
        image_token_index=IMAGE_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=PAD_ID,
    )
    return _finish(tf.LlavaForConditionalGeneration(cfg), seed)


def tiny_llava_next(seed: int = 0, layers: int = 3, head_dim: int = 16):
    torch.manual_seed(seed)
    cfg = tf.LlavaNextConfig(
        vision_config=_clip_vision(),
        text_config=tf.LlamaConfig(**_text_kwargs(layers, head_dim)),
        image_token_index=IMAGE_ID,
        image_grid_pinpoints=[[8, 8], [8, 16], [16, 8]],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=PAD_ID,
    )
    return _finish(tf.LlavaNextForConditionalGeneration(cfg), seed)


def tiny_llava_onevision(seed: int = 0, layers: int = 3, head_dim: int = 16):
    torch.manual_seed(seed)
    vision = tf.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
        vision_use_head=False,
    )
    cfg = tf.LlavaOnevisionConfig(
        vision_config=vision,
        text_config=tf.Qwen2Config(**_text_kwargs(layers, head_dim)),
        image_token_index=IMAGE_ID,
        video_token_index=VIDEO_ID,
        image_grid_pinpoints=[[8, 8], [8, 16], [16, 8]],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        pad_token_id=PAD_ID,
    )
    return _finish(tf.LlavaOnevisionForConditionalGeneration(cfg), seed)


def _mrope_text(layers, head_dim, cls):
    kw = _text_kwargs(layers, head_dim)
    half = head_dim // 2
    sec = [half - 2 * (half // 3), half // 3, half // 3]
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sec}
    return cls(**kw)


def _qwen_common(layers, head_dim):
    return dict(
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        pad_token_id=PAD_ID,
    )


def tiny_qwen2_vl(seed: int = 0, layers: int = 3, head_dim: int = 16):
    torch.manual_seed(seed)
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

    vision = Qwen2VLVisionConfig(
        depth=1,
        embed_dim=32,
        hidden_size=HEADS * head_dim,
        num_heads=2,
        mlp_ratio=2,
        patch_size=2,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )
    cfg = tf.Qwen2VLConfig(
        text_config=_mrope_text(layers, head_dim, Qwen2VLTextConfig),
        vision_config=vision,
        **_qwen_common(layers, head_dim),
    )
    return _finish(tf.Qwen2VLForConditionalGeneration(cfg), seed)


def tiny_qwen2_5_vl(seed: int = 0, layers: int = 3, head_dim: int = 16):
    torch.manual_seed(seed)
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
    )

    vision = Qwen2_5_VLVisionConfig(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=HEADS * head_dim,
        patch_size=2,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        window_size=8,
        fullatt_block_indexes=[1],
    )
    cfg = tf.Qwen2_5_VLConfig(
        text_config=_mrope_text(layers, head_dim, Qwen2_5_VLTextConfig),
        vision_config=vision,
        **_qwen_common(layers, head_dim),
    )
    return _finish(tf.Qwen2_5_VLForConditionalGeneration(cfg), seed)


FACTORIES = {
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "llava_onevision": tiny_llava_onevision,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
}
VLM_FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")


def _family(model) -> str:
    return {
        "LlavaForConditionalGeneration": "llava",
        "LlavaNextForConditionalGeneration": "llava_next",
        "LlavaOnevisionForConditionalGeneration": "llava_onevision",
        "Qwen2VLForConditionalGeneration": "qwen2_vl",
        "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
        "LlamaForCausalLM": "llama",
        "Qwen2ForCausalLM": "qwen2",
    }[type(model).__name__]


# Image sizes (H, W) cycled through for the anyres families, so images differ in token count.
_ANYRES_SIZES = [(8, 8), (8, 14), (14, 8)]
# (t, h, w) patch grids for the Qwen families (h, w multiples of spatial_merge_size).
_QWEN_GRIDS = [(1, 4, 4), (1, 2, 4), (1, 4, 2)]


def _image_features(model, fam, k, g):
    """Pixel tensor(s) for the k-th image of a batch and the number of placeholder tokens it needs."""
    if fam == "llava":
        vc = model.config.vision_config
        px = torch.randn(1, 3, vc.image_size, vc.image_size, generator=g)
        return {"pixel_values": px}, (vc.image_size // vc.patch_size) ** 2
    if fam in ("llava_next", "llava_onevision"):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        size = _ANYRES_SIZES[k % len(_ANYRES_SIZES)]
        vc = model.config.vision_config
        npatch = image_size_to_num_patches(size, model.config.image_grid_pinpoints, vc.image_size)
        px = torch.randn(1, npatch, 3, vc.image_size, vc.image_size, generator=g)
        sizes = torch.tensor([size])
        with torch.no_grad():
            feats = model.model.get_image_features(
                pixel_values=px,
                image_sizes=sizes,
                vision_feature_layer=model.config.vision_feature_layer,
                vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            ).pooler_output
        n = feats.shape[0] if isinstance(feats, torch.Tensor) else sum(f.shape[0] for f in feats)
        return {"pixel_values": px, "image_sizes": sizes}, n
    vc = model.config.vision_config
    t, h, w = _QWEN_GRIDS[k % len(_QWEN_GRIDS)]
    dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    px = torch.randn(t * h * w, dim, generator=g)
    return {"pixel_values": px, "image_grid_thw": torch.tensor([[t, h, w]])}, t * h * w // vc.spatial_merge_size**2


def make_inputs(
    model,
    batch: int = 2,
    images: list[int] | None = None,
    text_len: int = 5,
    seed: int = 0,
    pad_extra: list[int] | None = None,
) -> dict:
    """Input dict for ``model(**inputs)`` / ``model.generate(**inputs)``.

    images[i] is the number of images of sample i (default 1 each; text-only families
    take none). Sample i gets ``text_len + i`` leading text tokens (plus pad_extra[i]),
    so samples differ in length and the batch is left-padded with attention_mask 0.
    """
    fam = _family(model)
    g = torch.Generator().manual_seed(seed)
    text_only = fam in ("llama", "qwen2")
    if images is None:
        images = [0 if text_only else 1] * batch
    if len(images) != batch:
        raise ValueError(f"images must list one count per sample ({batch}), got {images}")
    if text_only and any(images):
        raise ValueError(f"{fam} is a text-only model; images must be all 0, got {images}")
    pad_extra = pad_extra or [0] * batch
    rand_text = lambda n: torch.randint(*TEXT_ID_RANGE, (n,), generator=g).tolist()
    seqs, types, pix, k = [], [], [], 0
    for i in range(batch):
        ids = rand_text(text_len + i + pad_extra[i])
        tt = [0] * len(ids)
        for _ in range(images[i]):
            extra, n = _image_features(model, fam, k, g)
            k += 1
            pix.append(extra)
            if fam in ("qwen2_vl", "qwen2_5_vl"):
                ids += [VISION_START_ID] + [IMAGE_ID] * n + [VISION_END_ID]
                tt += [0] + [1] * n + [0]
            else:
                ids += [IMAGE_ID] * n
                tt += [1] * n
            more = rand_text(2)
            ids += more
            tt += [0] * len(more)
        seqs.append(ids)
        types.append(tt)
    n = max(len(s) for s in seqs)
    input_ids = torch.full((batch, n), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros(batch, n, dtype=torch.long)
    mm = torch.zeros(batch, n, dtype=torch.long)
    for i, (s, t) in enumerate(zip(seqs, types)):
        input_ids[i, n - len(s) :] = torch.tensor(s)
        attention_mask[i, n - len(s) :] = 1
        mm[i, n - len(s) :] = torch.tensor(t)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if pix:
        for key in pix[0]:
            if key == "pixel_values" and fam in ("llava_next", "llava_onevision"):
                # Anyres images have different patch counts; pad the patch axis (the model slices it).
                m = max(p[key].shape[1] for p in pix)
                padded = [
                    torch.cat([p[key], p[key].new_zeros(1, m - p[key].shape[1], *p[key].shape[2:])], 1) for p in pix
                ]
                out[key] = torch.cat(padded, 0)
            else:
                out[key] = torch.cat([p[key] for p in pix], 0)
    if fam in ("qwen2_vl", "qwen2_5_vl"):
        out["mm_token_type_ids"] = mm
    return out


def sample_inputs(inputs: dict, i: int, model) -> dict:
    """Sample i of a batch from ``make_inputs``, with its padding removed (as if run alone)."""
    fam = _family(model)
    keep = inputs["attention_mask"][i].bool()
    out = {
        "input_ids": inputs["input_ids"][i : i + 1, keep],
        "attention_mask": inputs["attention_mask"][i : i + 1, keep],
    }
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = inputs["mm_token_type_ids"][i : i + 1, keep]
    vis = set(v for v in (IMAGE_ID, VIDEO_ID))
    counts = []
    for b in range(inputs["input_ids"].shape[0]):
        ids = inputs["input_ids"][b].tolist()
        # An image is a maximal run of placeholder tokens.
        counts.append(sum(1 for j, t in enumerate(ids) if t in vis and (j == 0 or ids[j - 1] not in vis)))
    lo, hi = sum(counts[:i]), sum(counts[: i + 1])
    if hi > lo:
        if fam in ("qwen2_vl", "qwen2_5_vl"):
            grids = inputs["image_grid_thw"]
            sizes = grids.prod(-1).tolist()
            start = sum(sizes[:lo])
            out["pixel_values"] = inputs["pixel_values"][start : start + sum(sizes[lo:hi])]
            out["image_grid_thw"] = grids[lo:hi]
        else:
            out["pixel_values"] = inputs["pixel_values"][lo:hi]
            if "image_sizes" in inputs:
                out["image_sizes"] = inputs["image_sizes"][lo:hi]
    return out
