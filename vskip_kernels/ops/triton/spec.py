"""What the Triton launchers declare for the ahead-of-time compile gate (``aot.py``).

A leaf below the launchers: they describe each configuration they can launch as an
``AotSpec`` and register a provider here; the gate collects them without the launchers
ever importing the gate.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Max dynamic shared memory per block (bytes) a kernel may use on each target.
SMEM_LIMITS = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
TARGETS = tuple(SMEM_LIMITS)

TRITON_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class AotSpec:
    name: str  # human-readable id, used as the pytest id
    fn: Any  # the @triton.jit function (not the autotuner wrapper)
    signature: dict  # arg name -> triton type string ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    # targets the config is launched on (autotune prunes configs by each target's smem)
    targets: tuple = TARGETS
    # per-parameter specialisation attributes, as Triton applies them at run time
    # (16-byte divisibility of pointers and strides): without them the compiled kernel
    # is not the one that runs (no vectorised loads, no K/V pipeline, less smem).
    attrs: dict = field(default_factory=dict)


_PROVIDERS: list[Callable[[], list[AotSpec]]] = []


def register_specs(provider: Callable[[], list[AotSpec]]) -> Callable[[], list[AotSpec]]:
    """Decorator for a launcher's ``aot_specs``; idempotent on module reload."""
    key = (provider.__module__, provider.__qualname__)
    _PROVIDERS[:] = [p for p in _PROVIDERS if (p.__module__, p.__qualname__) != key]
    _PROVIDERS.append(provider)
    return provider


def registered_specs() -> list[AotSpec]:
    return [spec for provider in _PROVIDERS for spec in provider()]
