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
    where = q[len("what is at the "):-1]
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
