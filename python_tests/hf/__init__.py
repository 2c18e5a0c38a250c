"""The transformers integration (vskip_kernels.hf): patching tiny random models of every
supported family, generate() against an independent plan reference, caches, compile, hardening,
and the visual-token rule shared with the vLLM plugin. Most files are marked ``hf``:
.ci/transformers_range.sh reruns them under the oldest supported transformers."""
