"""Calibration toolkit: score decoder layers and produce a SkipPlan.

``calibrate(model, batches, method, budget=... | skip_ratio=...)`` runs one method
(FlashVLM visual mass, V-Skip VIG, ShortV LC, or a baseline) and returns a plan;
``diagnostics(model, batches)`` reports Skip-It's redundancy measures per layer.
"""

from .api import DEFAULT_TARGETS, METHODS, calibrate
from .diagnostics import diagnostics

__all__ = ["calibrate", "diagnostics", "METHODS", "DEFAULT_TARGETS"]
