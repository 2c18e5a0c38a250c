"""Benchmark shapes: token layouts and head configurations of real VLMs.

Layouts are (kind, length) segments; "visual" segments are image or video tokens.
Head counts and head dims are those of the released 7B checkpoints' decoders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SYS, PROMPT = 35, 40  # system prompt before and question after the image, as in LLaVA-1.5 chat prompts


@dataclass(frozen=True)
class AttnShape:
    name: str
    model: str
    heads_q: int
    heads_kv: int
    head_dim: int
    segments: tuple  # ((kind, length), ...) with kind "text" or "visual"

    @property
    def seq_len(self) -> int:
        return sum(n for _, n in self.segments)

    @property
    def num_visual(self) -> int:
        return sum(n for k, n in self.segments if k == "visual")

    def describe(self) -> dict:
        return {
            "name": self.name,
            "model": self.model,
            "heads_q": self.heads_q,
            "heads_kv": self.heads_kv,
            "head_dim": self.head_dim,
            "seq_len": self.seq_len,
            "num_visual": self.num_visual,
            "segments": [list(s) for s in self.segments],
            "batch": 1,
        }


def one_image(n_visual: int) -> tuple:
    return (("text", SYS), ("visual", n_visual), ("text", PROMPT))


def interleaved(n_images: int, per_image: int, between: int) -> tuple:
    segs = [("text", SYS)]
    for i in range(n_images):
        segs.append(("visual", per_image))
        segs.append(("text", between if i < n_images - 1 else PROMPT))
    return tuple(segs)


ATTENTION_SHAPES = (
    AttnShape("llava15-7b", "LLaVA-1.5-7B", 32, 32, 128, one_image(576)),
    AttnShape("llava-next-7b", "LLaVA-NeXT-7B", 32, 32, 128, one_image(2880)),
    AttnShape("llava-ov-7b", "LLaVA-OneVision-7B", 28, 4, 128, one_image(7290)),
    AttnShape("qwen25vl-7b-video16k", "Qwen2.5-VL-7B", 28, 4, 128, one_image(16384)),
    AttnShape("qwen25vl-7b-video32k", "Qwen2.5-VL-7B", 28, 4, 128, one_image(32768)),
    AttnShape("llava15-7b-4img", "LLaVA-1.5-7B (4 interleaved images)", 32, 32, 128, interleaved(4, 576, 24)),
)

# One tiny interleaved layout with GQA: enough to exercise every code path on CPU.
SMOKE_ATTENTION_SHAPES = (
    AttnShape("smoke-2img", "tiny", 4, 2, 16, (("text", 5), ("visual", 64), ("text", 6), ("visual", 40), ("text", 7))),
)

# Visual-mass lengths N ~ 650 (LLaVA-1.5), 3k (LLaVA-NeXT), 8k (OneVision), 32k (video).
MASS_SHAPES = tuple(
    AttnShape(f"mass-n{n}", "LLaVA-1.5-7B heads", 32, 32, 128, one_image(n - SYS - PROMPT))
    for n in (651, 3000, 8000, 32768)
)
SMOKE_MASS_SHAPES = (AttnShape("smoke-mass-n64", "tiny", 4, 2, 16, (("text", 6), ("visual", 50), ("text", 8))),)

DECODE_CACHE_LENS = (4096, 8192, 16384, 32768)
DECODE_HEADS = (("llava-7b heads", 32, 32, 128), ("qwen2-7b heads", 28, 4, 128))
SMOKE_DECODE_CACHE_LENS = (96, 160)
SMOKE_DECODE_HEADS = (("tiny", 4, 2, 16),)


def is_visual_for(segments, device, batch: int = 1) -> torch.Tensor:
    flags = []
    for kind, n in segments:
        if kind not in ("text", "visual"):
            raise ValueError(f"segment kind must be 'text' or 'visual', got {kind!r}")
        flags.extend([kind == "visual"] * n)
    return torch.tensor(flags, dtype=torch.bool, device=device)[None].expand(batch, -1).contiguous()


def qkv(shape: AttnShape, device, dtype, nq: int | None = None, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    n = shape.seq_len
    nq = n if nq is None else nq

    def rnd(h, length):
        return torch.randn(1, h, length, shape.head_dim, generator=g, device=device, dtype=dtype)

    return rnd(shape.heads_q, nq), rnd(shape.heads_kv, n), rnd(shape.heads_kv, n)
