"""Triton backend: kernels with their launchers, masks and compile specs (CUDA; on CPU only in
Triton's interpreter). Imported lazily by the public ops in ``vskip_kernels.ops``."""
