"""vskip_kernels: modality-aware sparse attention and layer skipping for vision-language models."""

from .ops import modality_attention, modality_attention_varlen, received_attention, visual_attention_mass
from .plan import PruneStage, SkipPlan
from .schedule import Schedule, plan_schedule

__version__ = "0.1.0"

__all__ = [
    "modality_attention",
    "modality_attention_varlen",
    "visual_attention_mass",
    "received_attention",
    "plan_schedule",
    "Schedule",
    "SkipPlan",
    "PruneStage",
    "__version__",
]
