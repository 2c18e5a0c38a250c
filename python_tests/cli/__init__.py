"""The ``vskip`` command line (vskip_kernels.cli) end to end on a tiny local model, and its
error exits."""
