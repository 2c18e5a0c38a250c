"""Model inputs for task samples: prompts through the processor, answers as token ids."""

from __future__ import annotations

import torch

from .model import EOS, SPECIALS
from .task import CELL, COLOURS, GRID, IMAGE, SHAPES, SIZES, Sample, scene_questions


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
        labels[i, width - n :] = enc["input_ids"][i, width - n :]
    enc["labels"] = labels
    return enc


def _balanced_turns(candidates, exclude: str, n: int, rng) -> list[tuple[str, str]]:
    """Up to n (question, answer) pairs, question types taken in turn (random order within and
    across types): a scene offers about four count questions for every position question, and
    the spatial types are the slow ones to learn."""
    by_type: dict[str, list[tuple[str, str]]] = {}
    for q, a, t in candidates:
        if q != exclude:
            by_type.setdefault(t, []).append((q, a))
    queues = [[group[int(i)] for i in rng.permutation(len(group))] for _, group in sorted(by_type.items())]
    queues = [queues[int(i)] for i in rng.permutation(len(queues))]
    out: list[tuple[str, str]] = []
    while len(out) < n and any(queues):
        for queue in queues:
            if queue and len(out) < n:
                out.append(queue.pop())
    return out


def encode_training_dialogues(processor, batch: list[Sample], questions: int, rng) -> dict:
    """Like ``encode_training``, but each image is followed by up to ``questions`` question/answer turns.

    The first turn is the sample's own (balanced) question, in exactly the prompt format
    evaluation uses; later turns are other questions about the same scene
    (``task.scene_questions``), drawn with ``rng`` (a numpy Generator), one question type
    after another. Labels cover every answer and its EOS. The image's 64 tokens are most of
    a row's cost, so more turns give more signal per step for little extra time.
    """
    if questions < 1:
        raise ValueError(f"questions must be >= 1, got {questions!r}")
    first = encode_training(processor, batch)
    tok = processor.tokenizer
    pad = tok.pad_token_id

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    rows, labs = [], []
    for i, s in enumerate(batch):
        keep = first["attention_mask"][i].bool()
        row, lab = first["input_ids"][i][keep].tolist(), first["labels"][i][keep].tolist()
        for q, a in _balanced_turns(scene_questions(s.shapes), s.question, questions - 1, rng):
            prompt, answer = ids(q + "\n"), ids(a) + [EOS]
            row += prompt + answer
            lab += [-100] * len(prompt) + answer
        rows.append(row)
        labs.append(lab)
    width = max(map(len, rows))
    enc = dict(first)
    enc["input_ids"] = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    enc["attention_mask"] = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    enc["labels"] = torch.tensor([[-100] * (width - len(r)) + r for r in labs])
    return enc


# What each visual token's feature is trained to say about its patch (``patch_targets``):
# the cell's shape, colour and size (class 0: empty cell), and the cell's row and column as
# ordinals. Ordinals are read as thermometer bits (row > 0, row > 1, ...): "left of" and
# "in the top half" are then single directions of the feature, not comparisons of classes.
PATCH_CLASSES = {"kind": 1 + len(SHAPES), "colour": 1 + len(COLOURS), "size": 1 + len(SIZES)}
PATCH_ORDINALS = {"row": GRID, "col": GRID}
PATCH_TARGETS = {**PATCH_CLASSES, **PATCH_ORDINALS}


def patch_targets(batch: list[Sample], patch: int) -> torch.Tensor:
    """[B, P, 5] class ids per visual token (row-major patches of ``patch`` pixels), in ``PATCH_TARGETS`` order."""
    per_side = IMAGE // patch
    cell_of = torch.arange(per_side) * patch // CELL  # the grid cell row (or column) each patch lies in
    rows, cols = cell_of.repeat_interleave(per_side), cell_of.repeat(per_side)
    out = torch.zeros(len(batch), per_side * per_side, len(PATCH_TARGETS), dtype=torch.long)
    out[:, :, 3], out[:, :, 4] = rows, cols
    kinds, colours, sizes = list(SHAPES), list(COLOURS), list(SIZES)
    for i, s in enumerate(batch):
        for sh in s.shapes:
            at = (rows == sh.row) & (cols == sh.col)
            out[i, at, 0] = 1 + kinds.index(sh.kind)
            out[i, at, 1] = 1 + colours.index(sh.colour)
            out[i, at, 2] = 1 + sizes.index(sh.size)
    return out
