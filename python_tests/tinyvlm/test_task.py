"""The synthetic task: deterministic, balanced, answers consistent with the scene."""

from collections import Counter

import numpy as np
import pytest

from vskip_kernels.tinyvlm import task
from vskip_kernels.tinyvlm.task import ANSWERS, GRID, QUADRANTS, QUESTION_TYPES, sample, samples


def _truth(s):
    """The answer recomputed from the scene alone."""
    q = s.question
    kinds = {sh.kind: sh for sh in s.shapes}
    if s.qtype == "colour":
        return kinds[q.split()[-1].rstrip("?")].colour
    if s.qtype == "size":
        return kinds[q.split()[-1].rstrip("?")].size
    if s.qtype == "count":
        plural = q.split()[-1].rstrip("?")
        kind = next(k for k, p in task.PLURALS.items() if p == plural)
        return task.COUNTS[sum(sh.kind == kind for sh in s.shapes)]
    if s.qtype == "relation":
        words = q.rstrip("?").split()
        a, b = words[2], words[-1]
        return "yes" if kinds[a].col < kinds[b].col else "no"
    where = q[len("what is at the ") : -1]
    qr, qc = QUADRANTS[where]
    inside = [sh for sh in s.shapes if (sh.row // (GRID // 2), sh.col // (GRID // 2)) == (qr, qc)]
    assert len(inside) == 1
    return inside[0].kind


def test_answers_follow_from_the_scene():
    for s in samples("train", 0, 500):
        assert _truth(s) == s.answer, s
        cells = [(sh.row, sh.col) for sh in s.shapes]
        assert len(set(cells)) == len(cells)
        if s.qtype in ("colour", "size"):  # the asked shape is the only one of its kind
            kind = s.question.split()[-1].rstrip("?")
            assert sum(sh.kind == kind for sh in s.shapes) == 1


def test_deterministic_and_splits_differ():
    a, b = sample("eval", 7), sample("eval", 7)
    assert a == b
    assert np.array_equal(np.asarray(a.image()), np.asarray(b.image()))
    assert [s.shapes for s in samples("train", 0, 20)] != [s.shapes for s in samples("eval", 0, 20)]
    assert sample(1, 3) == sample("calibration", 3)


def test_types_and_answers_balanced():
    data = samples("train", 0, 2000)
    assert Counter(s.qtype for s in data) == {t: 400 for t in QUESTION_TYPES}
    for t in QUESTION_TYPES:
        counts = Counter(s.answer for s in data if s.qtype == t)
        assert set(counts) == set(ANSWERS[t])
        share = min(counts.values()) / max(counts.values())
        assert share > 0.6, (t, counts)


def test_image_is_rgb_64():
    im = sample("train", 0).image()
    assert im.size == (64, 64) and im.mode == "RGB"
    assert np.asarray(im).max() > 0


@pytest.mark.parametrize("bad", [-1, "test", 1.5, True])
def test_bad_split(bad):
    with pytest.raises(ValueError, match="split must be"):
        sample(bad, 0)


@pytest.mark.parametrize("bad", [-1, 2.0, None])
def test_bad_index(bad):
    with pytest.raises(ValueError, match="index must be"):
        sample("train", bad)


def test_scene_questions_follow_from_the_scene():
    """Every extra training question's answer, recomputed by _truth from the scene alone."""
    seen = Counter()
    for s in samples("train", 0, 300):
        qs = task.scene_questions(s.shapes)
        assert (s.question, s.answer, s.qtype) in qs  # the sample's own question is one of them
        assert len({q for q, _, _ in qs}) == len(qs)
        for q, a, t in qs:
            if t == "relation":
                words = q.rstrip("?").split()
                kinds = [sh for sh in s.shapes if sh.kind in (words[2], words[-1])]
                if len(kinds) != 2 or kinds[0].col == kinds[1].col:
                    pytest.fail(f"relation question without one answer: {q} {s.shapes}")
            assert a == _truth(task.Sample(s.shapes, q, a, t)), (q, a, s.shapes)
            seen[t] += 1
    assert set(seen) == set(QUESTION_TYPES)


def test_scene_questions_are_complete():
    """A question the templates can ask with one answer is always offered: count every candidate."""
    s = task.Sample(
        (
            task.Shape("circle", "red", "large", 0, 0),
            task.Shape("circle", "blue", "small", 0, 3),
            task.Shape("cross", "green", "small", 3, 1),
        ),
        "",
        "",
        "count",
    )
    qs = {q: a for q, a, _ in task.scene_questions(s.shapes)}
    assert qs["how many circles?"] == "two" and qs["how many squares?"] == "zero"
    assert "what colour is the circle?" not in qs  # two circles: no single answer
    assert qs["what colour is the cross?"] == "green" and qs["what size is the cross?"] == "small"
    assert "is the circle left of the cross?" not in qs
    assert qs["what is at the top left?"] == "circle" and qs["what is at the bottom left?"] == "cross"
    assert qs["what is at the top right?"] == "circle" and "what is at the bottom right?" not in qs
    assert len(qs) == 4 + 2 + 3  # four counts, the cross's colour and size, three quadrants
