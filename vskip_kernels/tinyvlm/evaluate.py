"""Accuracy of the tiny VLM on task samples, and the text-only control.

An answer is right when the greedy output, up to EOS, is exactly the answer string.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch

from .data import encode_prompts, encode_training
from .model import EOS, SPECIALS
from .task import Sample, samples


def decode_answer(tokenizer, ids) -> str:
    """Characters up to the first EOS; special tokens dropped (the tokenizer is per character)."""
    out = []
    for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids]):
        if t == SPECIALS[EOS]:
            break
        if t not in SPECIALS:
            out.append(t)
    return "".join(out)


def prepare_inputs(batch: dict, model) -> dict:
    from ..calibrate._common import prepare

    return prepare(batch, model)


@torch.no_grad()
def generate_answers(model, processor, batch: list[Sample], max_new_tokens: int = 10) -> tuple[list[str], torch.Tensor]:
    """(answers, generated token ids [B, max_new_tokens]) by greedy decoding."""
    inputs = prepare_inputs(encode_prompts(processor, batch), model)
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=SPECIALS.index("<pad>"), eos_token_id=EOS
    )
    gen = out[:, inputs["input_ids"].shape[1] :]
    if gen.shape[1] < max_new_tokens:  # every row stopped early: pad so callers can compare runs
        gen = torch.cat([gen, gen.new_full((gen.shape[0], max_new_tokens - gen.shape[1]), SPECIALS.index("<pad>"))], 1)
    return [decode_answer(processor.tokenizer, g) for g in gen], gen


@torch.no_grad()
def teacher_forced_correct(model, processor, batch: list[Sample], *, text_only: bool = False) -> torch.Tensor:
    """Per sample: is the argmax right at every answer position and at EOS?

    That is exactly "greedy decoding produces the answer", in one forward pass.
    """
    enc = prepare_inputs(encode_training(processor, batch, text_only=text_only), model)
    labels = enc.pop("labels")
    logits = model(**enc).logits[:, :-1]
    target = labels[:, 1:]
    ok = (logits.argmax(-1) == target) | (target == -100)
    return ok.all(dim=1)


def accuracy(model, processor, split, start: int, count: int, batch_size: int = 64) -> dict:
    """Greedy-decoding accuracy overall and per question type on samples [start, start+count)."""
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    data = samples(split, start, count)
    for i in range(0, len(data), batch_size):
        chunk = data[i : i + batch_size]
        answers, _ = generate_answers(model, processor, chunk)
        for s, a in zip(chunk, answers):
            total[s.qtype] += 1
            right[s.qtype] += a == s.answer
    return {
        "accuracy": sum(right.values()) / max(sum(total.values()), 1),
        "per_type": {t: right[t] / total[t] for t in total},
    }


def question_prior_accuracy(train: list[Sample], test: list[Sample]) -> float:
    """Text-only control: answer each test question with its most frequent training answer.

    This is the best any model that reads only the question can do (given enough training
    data), so it bounds every text-only model from above.
    """
    if not train or not test:
        raise ValueError("question_prior_accuracy needs training and test samples")
    by_question: dict[str, Counter] = defaultdict(Counter)
    for s in train:
        by_question[s.question][s.answer] += 1
    overall = Counter(s.answer for s in train)
    right = 0
    for s in test:
        counts = by_question.get(s.question) or overall
        right += counts.most_common(1)[0][0] == s.answer
    return right / len(test)
