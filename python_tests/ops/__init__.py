"""Kernels, backends and the public attention API: Triton (interpreter on CPU) and torch
backends against the reference, schedules, paged attention, FlexAttention interop, the native
extension, compile gates and hardening."""
