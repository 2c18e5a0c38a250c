"""Model inputs for task samples: prompts through the processor, answers as token ids."""
from __future__ import annotations

import torch

from .model import EOS, SPECIALS
from .task import Sample


def prompts(processor, batch: list[Sample]) -> list[str]:
    from ..calibrate.data import prompt_text

    return [prompt_text(processor, s.question, 1) for s in batch]


def encode_prompts(processor, batch: list[Sample], *, text_only: bool = False) -> dict:
    """Left-padded generation inputs (what ``generate`` and ``calibrate`` take).

    ``text_only`` drops the image and its tokens: the question alone, for the control.
    """
    from ..calibrate.data import encode

    if not batch:
        raise ValueError("encode_prompts needs at least one sample")
    if text_only:
        tok = processor.tokenizer
        tok.padding_side = "left"
        return dict(tok([s.question + "\n" for s in batch], return_tensors="pt", padding=True))
    return encode(processor, [s.question for s in batch], [[s.image()] for s in batch])


def encode_training(processor, batch: list[Sample], *, text_only: bool = False) -> dict:
    """Prompt, answer and EOS, left-padded, with ``labels`` on the answer and EOS only.

    Left padding puts every answer at the end of its row, so the labels are the last
    len(answer) + 1 columns of each row. (RoPE is relative, so the row's offset from the
    padding does not change what the model computes.)
    """
    if not batch:
        raise ValueError("encode_training needs at least one sample")
    tok = processor.tokenizer
    tok.padding_side = "left"
    eos = SPECIALS[EOS]
    if text_only:
        texts = [s.question + "\n" + s.answer + eos for s in batch]
        enc = dict(tok(texts, return_tensors="pt", padding=True))
    else:
        texts = [p + s.answer + eos for p, s in zip(prompts(processor, batch), batch)]
        enc = dict(processor(text=texts, images=[s.image() for s in batch], return_tensors="pt", padding=True))
    labels = torch.full_like(enc["input_ids"], -100)
    width = labels.shape[1]
    for i, s in enumerate(batch):
        n = len(tok(s.answer, add_special_tokens=False)["input_ids"]) + 1
        labels[i, width - n:] = enc["input_ids"][i, width - n:]
    enc["labels"] = labels
    return enc
