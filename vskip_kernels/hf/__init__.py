"""Hugging Face drop-in: the "vskip" attention backend plus frozen and decode-bypassed layers.

``apply_skip_plan(model, plan)`` patches a transformers VLM or causal LM in place and
returns a ``SkipHandle`` whose ``remove()`` restores it.
"""

from .compat import kv_cache_bytes
from .models import decoder_layers, language_model, num_decoder_layers, visual_token_ids
from .patch import SkipHandle, apply_skip_plan
from .state import VisualMassRecorder

__all__ = [
    "apply_skip_plan",
    "SkipHandle",
    "VisualMassRecorder",
    "decoder_layers",
    "kv_cache_bytes",
    "language_model",
    "num_decoder_layers",
    "visual_token_ids",
]
