"""Which new positions are visual: the rule both integrations (hf/, vllm/) apply.

A position is visual when its input id is one of the model's image/video placeholder ids
and it is a prompt position. A generated token fed back is text even when the model
emitted a placeholder id: frameworks give it the id's text embedding, not visual features.
"""

from __future__ import annotations

import torch


class VisualTokenRule:
    """Placeholder ids of one model; ``is_visual`` applies the rule to a call's new positions."""

    def __init__(self, visual_ids):
        self.visual_ids = [int(i) for i in visual_ids]
        self._ids: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _id_tensor(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        t = self._ids.get(key)
        if t is None:
            t = self._ids[key] = torch.tensor(self.visual_ids, device=like.device, dtype=like.dtype)
        return t

    def is_visual(self, input_ids: torch.Tensor, generated: bool | torch.Tensor = False) -> torch.Tensor:
        """bool tensor shaped like ``input_ids``. generated: True when every position is a
        generated token, or a bool tensor (broadcastable) marking the generated ones."""
        if not self.visual_ids or (isinstance(generated, bool) and generated):
            return torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        vis = torch.isin(input_ids, self._id_tensor(input_ids))
        if isinstance(generated, torch.Tensor):
            vis = vis & ~generated.to(device=vis.device, dtype=torch.bool)
        return vis
