"""Pieces shared by the Triton launchers (prefill, split-KV decode, visual mass).

The debug tile counter every kernel reports to, dtype and tile-size rules of the
split kernels, their split count, and the AOT spec helpers of the compile gate.
"""
from __future__ import annotations

import contextlib
import functools
import types

import torch
import triton

from ...kinds import LOG2E  # noqa: F401  (launchers scale softmax_scale by it)
from ..dispatch import interpreter_on
from .spec import AotSpec

DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
ELEM = {"fp16": 2, "bf16": 2, "fp32": 4}
# Split kernels: row blocks of (query, head) rows, and the padded head dims
# (64 | 80, 96, 128 | 256) each compiled kernel serves.
ROW_BLOCKS = (16, 64)
BLOCK_DS = (64, 128, 256)
MAX_SPLITS = 128


# ----------------------------------------------------------------------------- tile counter


class TileCount:
    """Device-side int32 count of processed (query tile, key tile) pairs."""

    def __init__(self, device):
        self.tensor = torch.zeros(1, dtype=torch.int32, device=device)

    @property
    def value(self) -> int:
        return int(self.tensor.item())


_ACTIVE: list[TileCount] = []


@contextlib.contextmanager
def count_tiles(device=None):
    """Count tile pairs processed by Triton kernels launched inside the block.

    The counter lives on ``device`` (default: CUDA when kernels run on the GPU, CPU
    under the interpreter). Kernels launched while it is active are compiled with
    COUNT_TILES=True and add 1 per tile pair; read ``.value`` afterwards.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() and not interpreter_on() else "cpu"
    counter = TileCount(device)
    _ACTIVE.append(counter)
    try:
        yield counter
    finally:
        _ACTIVE.remove(counter)


def active_counter() -> torch.Tensor | None:
    """The int32 [1] tensor kernels should atomically add to, or None when not counting."""
    return _ACTIVE[-1].tensor if _ACTIVE else None


def checked_counter(device: torch.device) -> torch.Tensor | None:
    """``active_counter()``, refusing one on another device than the kernel's."""
    counter = active_counter()
    if counter is not None and counter.device.type != device.type:
        raise ValueError(f"count_tiles() counter is on {counter.device} but the kernel runs on {device}; "
                         f"use count_tiles(device={str(device)!r})")
    return counter


# ----------------------------------------------------------------------------- tile sizes


def check_supported(what: str, dtype: torch.dtype, head_dim: int) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"{what} supports float16, bfloat16 and float32, got {dtype}")
    if not 16 <= head_dim <= 256:
        raise ValueError(f"{what} supports head dims 16..256 (64, 80, 96, 128, 256 tuned), got D={head_dim}")



def block_d_for(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def split_block_n(block_d: int, dtype: str) -> int:
    # K (and V) tiles of at most 16 KiB each: double-buffered, plus the Q tile, they
    # stay inside sm86/sm89's 99 KiB at every head dim.
    return min(64, 16384 // (block_d * ELEM[dtype]))


def row_blocks(dtype: str) -> tuple[int, ...]:
    # A 64-row fp32 Q tile at head dim 256 alone takes 64 KiB of shared memory.
    return ROW_BLOCKS[:1] if dtype == "fp32" else ROW_BLOCKS


def row_block_for(rows: int, dtype: str) -> int:
    """The split kernels' row block: the smallest holding ``rows``, else the largest."""
    return next((r for r in row_blocks(dtype) if r >= rows), row_blocks(dtype)[-1])


def f32_dot(dtype: torch.dtype) -> bool:
    # fp32 inputs: exact dots (no TF32). bf16 under the interpreter: its dot
    # misreads bf16 operands, and fp32 dots of bf16 values give the same products.
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreter_on())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_count(programs: int, tiles: int, device: torch.device, cpu_splits: int) -> int:
    """Splits of ``tiles`` key tiles per program: about two waves of programs in
    all, at least one key tile each; ``cpu_splits`` under the interpreter, so
    tests cross split boundaries."""
    if tiles <= 1:
        return 1
    if device.type != "cuda":
        return min(cpu_splits, tiles)
    want = triton.cdiv(2 * _sm_count(device.index or 0), max(1, programs))
    return max(1, min(want, tiles, MAX_SPLITS))


# ----------------------------------------------------------------------------- AOT specs

# Integer arguments that are multiples of 16 at run time (Triton specialises them,
# which enables vectorised loads and the multi-buffered K/V pipeline).
ALIGNED_INTS = frozenset(
    ("head_dim", "tile_n", "stride_qm", "stride_qn", "stride_qs", "stride_om", "stride_on", "stride_kn", "stride_vn",
     "stride_qt", "stride_ot")
    + tuple(f"stride_{t}{s}" for t in "qkvo" for s in "bh"))


def kernel_signature(pointers: dict, i32=(), constexpr=()) -> dict:
    """A compile signature: ``pointers`` (name -> type), then the i32 and constexpr names."""
    return {**pointers, **dict.fromkeys(i32, "i32"), **dict.fromkeys(constexpr, "constexpr")}


def aot_spec(*, fn, signature, **kw) -> AotSpec:
    """An AotSpec with the run-time divisibility attributes, so the gate measures the
    kernel that really runs (launch-time alignment raises shared memory use:
    without them the loads are not vectorised and the K/V pipeline is not built)."""
    code = fn.fn.__code__  # the Python function behind a JIT or interpreter kernel
    names = code.co_varnames[: code.co_argcount]
    if set(names) != set(signature):
        raise ValueError(f"{fn.fn.__name__} signature lists {sorted(signature)}, the kernel takes {names}")
    signature = {n: signature[n] for n in names}  # attrs are keyed by parameter index
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if signature[n].startswith("*") or n in ALIGNED_INTS}
    return AotSpec(fn=fn, signature=signature, attrs=attrs, **kw)


def compilable(kernel):
    """A JITFunction of ``kernel`` whose @triton.jit helpers are JITFunctions too.

    Under TRITON_INTERPRET=1 every @triton.jit object is an interpreter function, so
    re-wrapping only the kernel leaves its helpers uncompilable; rebuild them over a
    copy of the module globals. (Compiling under the interpreter still fails on
    triton.language's own @jit helpers such as tl.sum, so the compile gate compiles
    in a subprocess without the interpreter.)
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, InterpretedFunction):
        return kernel
    env = dict(kernel.fn.__globals__)

    def rebuild(f):
        return JITFunction(types.FunctionType(f.__code__, env, f.__name__, f.__defaults__, f.__closure__))

    for name, val in list(env.items()):
        if isinstance(val, InterpretedFunction):
            env[name] = rebuild(val.fn)
    return rebuild(kernel.fn)
