"""A tiny LLaVA that answers questions about synthetic scenes, trained here and shipped.

``load_pretrained()`` gives (model, processor) of the shipped weights; ``task.sample``
generates the data; ``python -m vskip_kernels.tinyvlm.train`` retrains it (see README).
"""

from .model import WEIGHTS_DIR, build_model, build_processor, load_pretrained
from .task import QUESTION_TYPES, Sample, sample, samples

__all__ = [
    "load_pretrained",
    "build_model",
    "build_processor",
    "WEIGHTS_DIR",
    "sample",
    "samples",
    "Sample",
    "QUESTION_TYPES",
]
