"""Greedy generation with per-step scores, and its comparison, shared by the HF tests that
check a patched model against a reference run."""

from __future__ import annotations

import torch


def greedy_steps(model, inputs, steps: int, **kw):
    """(new tokens [B, steps], scores [B, steps, V], generate()'s output) of exactly ``steps``
    greedy tokens."""
    out = model.generate(
        **inputs,
        do_sample=False,
        max_new_tokens=steps,
        min_new_tokens=steps,
        output_scores=True,
        return_dict_in_generate=True,
        **kw,
    )
    n = inputs["input_ids"].shape[1]
    return out.sequences[:, n:], torch.stack(out.scores, 1), out


def assert_same_generation(got, want, atol: float) -> None:
    """Same scores at every step (within atol) and the same tokens; got/want as greedy_steps returns."""
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=atol)
    assert torch.equal(got[0], want[0]), (got[0], want[0])
