"""The shared rule for which new positions are visual (used by the HF and vLLM integrations)."""

import torch

from vskip_kernels.visual_tokens import VisualTokenRule


def test_placeholders_are_visual_in_prompts_and_text_when_generated():
    rule = VisualTokenRule([7, 9])
    ids = torch.tensor([[1, 7, 7, 9, 3], [9, 2, 7, 4, 4]])
    want = torch.tensor([[0, 1, 1, 1, 0], [1, 0, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(rule.is_visual(ids), want)
    assert not rule.is_visual(ids, generated=True).any()
    gen = torch.tensor([[False, False, True, True, False], [True, False, False, False, False]])
    assert torch.equal(rule.is_visual(ids, generated=gen), want & ~gen)
    assert rule.is_visual(ids.int()).dtype == torch.bool  # ids of another dtype


def test_a_text_only_model_has_no_visual_positions():
    assert not VisualTokenRule([]).is_visual(torch.tensor([[7, 9]])).any()
