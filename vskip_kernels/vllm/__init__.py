"""vLLM integration: run a SkipPlan inside vLLM.

vLLM loads this through the entry point ``vskip`` of the group ``vllm.general_plugins``
(installed with the package); nothing is imported by hand. A plan is given per engine::

    LLM(model=..., additional_config={"vskip_plan": "plan.json"})
    vllm serve MODEL --additional-config '{"vskip_plan": "plan.json"}'

``additional_config["vskip_backend"]`` picks the paged kernel: ``"auto"`` (Triton on CUDA,
PyTorch on CPU), ``"torch"`` or ``"triton"`` (on CPU under ``TRITON_INTERPRET=1`` only).
Without ``vskip_plan`` (or with an empty plan) vLLM runs exactly as without the plugin.
"""

from __future__ import annotations

from .config import KERNEL_KEY, PLAN_KEY, plan_from_additional_config

__all__ = ["register", "PLAN_KEY", "KERNEL_KEY", "plan_from_additional_config"]


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group: installs the hooks (idempotent)."""
    from .compat import install

    install()
