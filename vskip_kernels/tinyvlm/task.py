"""The synthetic visual question task: scenes of coloured shapes and questions about them.

A scene is a 4 x 4 grid of 16-pixel cells on a 64 x 64 grey image; each occupied cell
holds one shape (circle, square, triangle, cross) of one colour and one of two sizes.
Every question has a one- or two-word answer, and the answer is drawn first, uniformly
over its type's answers, then a scene that makes it true: so the question text alone
says nothing about the answer beyond its type (the text-only control measures this).

Samples are a pure function of (split, index): the same split and index always give
the same image, question and answer, on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

IMAGE = 64
GRID = 4
CELL = IMAGE // GRID
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
# "blue"/"black" share a prefix, as do "circle"/"cross" and "two"/"three": the answer is
# then not settled by its first token, so decode steps (and decode bypass) matter.
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (235, 220, 50),
    "black": (0, 0, 0),
}
# The background is CLIP's mean pixel, which the processor maps to zero: background patches
# then embed to almost nothing and the few object tokens are not drowned out by 60 loud
# background tokens (on black, the model did not learn to look in 1000 steps).
BACKGROUND = (123, 117, 104)
# A cell is 2 x 2 patches of the vision tower: a shape covers 4 of the 64 visual tokens, so
# the objects are not drowned in background tokens (which makes the model slow to train).
SIZES = {"large": 14, "small": 9}
COUNTS = ("zero", "one", "two", "three")
QUADRANTS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}

# Every word the question templates below use (the tokenizer gives each its own token).
QUESTION_WORDS = tuple(
    sorted(
        {"what", "colour", "is", "the", "size", "how", "many", "left", "of", "at"}
        | set(SHAPES)
        | set(PLURALS.values())
        | {w for q in QUADRANTS for w in q.split()}
    )
)

QUESTION_TYPES = ("colour", "count", "relation", "position", "size")
ANSWERS = {
    "colour": tuple(COLOURS),
    "count": COUNTS,
    "relation": ("yes", "no"),
    "position": SHAPES,
    "size": tuple(SIZES),
}
# Disjoint seed streams per split: calibration and evaluation never see training scenes'
# random streams. Any other non-negative int is a valid custom split.
SPLITS = {"train": 0, "calibration": 1, "eval": 2}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    row: int
    col: int


@dataclass(frozen=True)
class Sample:
    shapes: tuple[Shape, ...]
    question: str
    answer: str
    qtype: str

    def image(self):
        return render(self.shapes)


def _split_id(split) -> int:
    if isinstance(split, str):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)} or a non-negative int, got {split!r}")
        return SPLITS[split]
    if isinstance(split, bool) or not isinstance(split, int) or split < 0:
        raise ValueError(f"split must be one of {list(SPLITS)} or a non-negative int, got {split!r}")
    return split


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _free_cells(rng, taken: set, allowed=None):
    cells = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in taken]
    if allowed is not None:
        cells = [rc for rc in cells if allowed(*rc)]
    return [cells[i] for i in rng.permutation(len(cells))]


def _place(rng, kinds, taken: set, allowed=None) -> list[Shape]:
    cells = _free_cells(rng, taken, allowed)
    if len(cells) < len(kinds):
        raise RuntimeError("scene has no room left")  # cannot happen with at most 6 shapes on 16 cells
    out = []
    for kind, (r, c) in zip(kinds, cells):
        taken.add((r, c))
        out.append(Shape(kind, _pick(rng, tuple(COLOURS)), _pick(rng, tuple(SIZES)), r, c))
    return out


def _distractors(rng, exclude, n_min: int, n_max: int, taken: set, allowed=None) -> list[Shape]:
    kinds = [k for k in SHAPES if k not in exclude]
    n = int(rng.integers(n_min, n_max + 1))
    return _place(rng, [_pick(rng, kinds) for _ in range(n)], taken, allowed)


def sample(split, index: int) -> Sample:
    """The ``index``-th sample of ``split`` ("train", "calibration", "eval" or an int)."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    rng = np.random.default_rng([_split_id(split), index])
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]  # types in equal shares in every split
    answer = _pick(rng, ANSWERS[qtype])
    taken: set = set()
    if qtype in ("colour", "size"):
        kind = _pick(rng, SHAPES)
        target = _place(rng, [kind], taken)[0]
        target = Shape(
            kind,
            answer if qtype == "colour" else target.colour,
            answer if qtype == "size" else target.size,
            target.row,
            target.col,
        )
        shapes = [target] + _distractors(rng, {kind}, 1, 4, taken)
        question = f"what colour is the {kind}?" if qtype == "colour" else f"what size is the {kind}?"
    elif qtype == "count":
        kind = _pick(rng, SHAPES)
        k = COUNTS.index(answer)
        shapes = _place(rng, [kind] * k, taken) + _distractors(rng, {kind}, 1 if k else 2, 3, taken)
        question = f"how many {PLURALS[kind]}?"
    elif qtype == "relation":
        a, b = (SHAPES[i] for i in rng.choice(len(SHAPES), 2, replace=False))
        ca, cb = (int(x) for x in rng.choice(GRID, 2, replace=False))
        if (ca < cb) != (answer == "yes"):
            ca, cb = cb, ca
        ra, rb = (int(x) for x in rng.integers(0, GRID, 2))
        taken.update({(ra, ca), (rb, cb)})
        shapes = [
            Shape(a, _pick(rng, tuple(COLOURS)), _pick(rng, tuple(SIZES)), ra, ca),
            Shape(b, _pick(rng, tuple(COLOURS)), _pick(rng, tuple(SIZES)), rb, cb),
        ]
        shapes += _distractors(rng, {a, b}, 0, 3, taken)
        question = f"is the {a} left of the {b}?"
    else:  # position: exactly one shape in the asked quadrant
        where = _pick(rng, tuple(QUADRANTS))
        qr, qc = QUADRANTS[where]

        def inside(r, c):
            return (r // (GRID // 2), c // (GRID // 2)) == (qr, qc)

        shapes = _place(rng, [answer], taken, inside)
        shapes += _distractors(rng, (), 1, 4, taken, lambda r, c: not inside(r, c))
        question = f"what is at the {where}?"
    order = rng.permutation(len(shapes))  # drawing order carries no hint of the answer
    return Sample(tuple(shapes[i] for i in order), question, answer, qtype)


def scene_questions(shapes) -> list[tuple[str, str, str]]:
    """Every question the templates can ask about ``shapes`` that has one answer: (question, answer, type).

    Computed from the scene alone. Training asks several of them per image, so each image
    (the expensive part of a training row) carries several answers' worth of signal.
    """
    by_kind: dict[str, list[Shape]] = {k: [s for s in shapes if s.kind == k] for k in SHAPES}
    out = []
    for k in SHAPES:
        if len(by_kind[k]) < len(COUNTS):
            out.append((f"how many {PLURALS[k]}?", COUNTS[len(by_kind[k])], "count"))
        if len(by_kind[k]) == 1:
            out.append((f"what colour is the {k}?", by_kind[k][0].colour, "colour"))
            out.append((f"what size is the {k}?", by_kind[k][0].size, "size"))
    for a in SHAPES:
        for b in SHAPES:
            if a != b and len(by_kind[a]) == len(by_kind[b]) == 1 and by_kind[a][0].col != by_kind[b][0].col:
                out.append(
                    (
                        f"is the {a} left of the {b}?",
                        "yes" if by_kind[a][0].col < by_kind[b][0].col else "no",
                        "relation",
                    )
                )
    half = GRID // 2
    for where, (qr, qc) in QUADRANTS.items():
        inside = [s for s in shapes if (s.row // half, s.col // half) == (qr, qc)]
        if len(inside) == 1:
            out.append((f"what is at the {where}?", inside[0].kind, "position"))
    return out


def samples(split, start: int, count: int) -> list[Sample]:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    return [sample(split, start + i) for i in range(count)]


def render(shapes) -> Image.Image:
    """The scene as a 64 x 64 RGB PIL image."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (IMAGE, IMAGE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in shapes:
        side = SIZES[s.size]
        x0 = s.col * CELL + (CELL - side) // 2
        y0 = s.row * CELL + (CELL - side) // 2
        x1, y1 = x0 + side - 1, y0 + side - 1
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif s.kind == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif s.kind == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:  # cross: a plus sign with bars about a third of the side thick
            t = max(side // 3, 2)
            m0 = x0 + (side - t) // 2
            n0 = y0 + (side - t) // 2
            draw.rectangle([m0, y0, m0 + t - 1, y1], fill=fill)
            draw.rectangle([x0, n0, x1, n0 + t - 1], fill=fill)
    return img


def chance_accuracy(qtypes) -> float:
    """Expected accuracy of guessing uniformly within each question's answer set."""
    qtypes = list(qtypes)
    if not qtypes:
        raise ValueError("chance_accuracy needs at least one question type")
    return float(np.mean([1.0 / len(ANSWERS[t]) for t in qtypes]))
