from .attention import modality_attention, modality_attention_varlen, varlen_layout
from .received_attention import received_attention
from .visual_mass import visual_attention_mass

__all__ = [
    "modality_attention",
    "modality_attention_varlen",
    "received_attention",
    "varlen_layout",
    "visual_attention_mass",
]
