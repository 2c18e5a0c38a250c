"""vLLM-env tests: in-process engine, a small CPU KV cache. Nothing here imports vLLM, so the
main test environment (without vLLM) collects this folder cheaply and skips its tests."""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
