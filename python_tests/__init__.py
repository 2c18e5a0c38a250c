"""The test suite, a package: shared helpers import as ``python_tests.<module>`` (pytest's
default import mode puts the checkout on sys.path for a package's test files).

Layout, by the layer under test: ``ops/`` kernels, backends and the public attention API;
``hf/`` the transformers integration; ``calibrate/`` skip plans and their calibration;
``cli/`` the ``vskip`` command; ``bench/`` the benchmark suites and the GPU check;
``tinyvlm/`` the demo's model and task; ``vllm/`` the vLLM plugin
(its own environment, see .ci/vllm.sh; not a package: its files import each other by bare
name); package-wide checks at the top. Helpers used by one folder live in it;
``hf_models.py`` (tiny transformers models, also loaded by vllm/ from this folder) and
``_shared.py`` (kernel test helpers and the tolerance rule, also used by
bench/test_cuda_integration.py) serve several.
"""

from pathlib import Path

# The checkout the tests belong to (subprocess tests put it on PYTHONPATH; csrc/ lives there).
REPO_ROOT = Path(__file__).resolve().parent.parent
