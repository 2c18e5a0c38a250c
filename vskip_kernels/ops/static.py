"""Static quality of a compiled kernel configuration: what the GPU would run, read without one.

For one ``AotSpec`` and target (``aot.compile_spec``), ``inspect_spec`` returns what
``ptxas -v`` reported while Triton compiled it (registers, spill stores/loads, stack frame),
the shared memory Triton allocated, the theoretical occupancy those give on the target, and
the SASS instruction mix read from the cubin with ``nvdisasm``: tensor-core MMAs (HMMA on
sm80-89, HGMMA on sm90), asynchronous global-to-shared copies (LDGSTS, or the TMA engine's
UTMALDG/UBLKCP on sm90), local-memory accesses (LDL/STL: spills and stack arrays) and the
instruction count of the main KV loop (the backward-branch loop with the most MMAs).

Used by ``vskip bench static`` (the report) and the compile gate's tests; nothing else in the
package imports it. The tools are the ones Triton's wheel bundles (``triton.knobs.nvidia``),
so the numbers come from the same ``ptxas`` that builds the kernels at run time.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field

from . import aot


@dataclass(frozen=True)
class TargetLimits:
    """Per-SM limits of one compute capability (CUDA programming guide, Table 'Technical
    Specifications per Compute Capability')."""

    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_threads_per_sm: int = 2048
    max_ctas_per_sm: int = 32
    smem_per_sm: int = 164 * 1024  # carve-out maximum usable by CTAs of the SM
    smem_per_cta: int = 163 * 1024  # opt-in maximum of one CTA (aot.SMEM_LIMITS)
    smem_reserved_per_cta: int = 1024  # the driver's per-CTA reservation
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of this many


LIMITS = {
    80: TargetLimits(),
    86: TargetLimits(max_threads_per_sm=1536, max_ctas_per_sm=16, smem_per_sm=100 * 1024, smem_per_cta=99 * 1024),
    89: TargetLimits(max_threads_per_sm=1536, max_ctas_per_sm=24, smem_per_sm=100 * 1024, smem_per_cta=99 * 1024),
    90: TargetLimits(smem_per_sm=228 * 1024, smem_per_cta=227 * 1024),
}
assert all(LIMITS[cc].smem_per_cta == aot.SMEM_LIMITS[cc] for cc in aot.TARGETS)

# SASS opcode families, by the opcode's first dot-separated part.
MMA_OPS = {"HMMA", "HGMMA", "IMMA", "DMMA"}  # tensor-core matrix multiply-accumulate
ASYNC_COPY_OPS = {"LDGSTS", "UTMALDG", "UBLKCP", "UTMAPF"}  # cp.async and the TMA engine
LOCAL_OPS = {"LDL", "STL"}  # local memory: register spills and stack arrays
BRANCH_OPS = {"BRA", "JMP", "BRX", "JMX"}


@dataclass
class KernelReport:
    name: str
    cc: int
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int  # bytes per thread, as ptxas -v reports them
    spill_loads: int
    stack_frame: int
    shared: int
    ctas_per_sm: int
    warps_per_sm: int
    occupancy: float  # warps per SM / the target's maximum
    limiter: str  # what bounds ctas_per_sm: registers, shared, warps or ctas
    instructions: int
    mma: int
    async_copy: int
    local: int
    loop_instructions: int  # instructions of the main KV loop's body (0: no MMA loop)
    loop_mma: int
    opcodes: dict = field(default_factory=dict)  # opcode family -> count
    loaded: dict | None = None  # on a GPU: n_regs / n_spills of the loaded kernel

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- ptxas log

_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str) -> dict:
    """Registers, spill stores/loads and stack frame (bytes per thread) of the one entry
    function in ``ptxas -v`` output."""
    regs, spill = _REGS.findall(log), _SPILL.findall(log)
    if len(regs) != 1 or len(spill) != 1:
        raise ValueError(f"expected one function's ptxas -v report, got:\n{log}")
    stack, stores, loads = (int(x) for x in spill[0])
    return {"registers": int(regs[0]), "spill_stores": stores, "spill_loads": loads, "stack_frame": stack}


def compile_with_log(spec: aot.AotSpec, cc: int):
    """(compiled kernel, ptxas -v log). Triton always runs ptxas with -v and prints its log
    when ``knobs.nvidia.dump_ptxas_log`` is set; it is captured here, not rerun. A kernel
    Triton found in its cache skips ptxas, so the cache is off for this compile."""
    from triton import knobs

    buf = io.StringIO()
    with knobs.nvidia.scope(), knobs.cache.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(buf):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        kernel = aot.compile_spec(spec, cc)
    return kernel, buf.getvalue()


# ----------------------------------------------------------------------------- SASS

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)(.*?);", re.M)
_LABEL = re.compile(r"^(\.L_x_\d+):", re.M)
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def disassemble(cubin: bytes) -> str:
    """The cubin's SASS, from the ``nvdisasm`` bundled with Triton."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([knobs.nvidia.nvdisasm.path, "-c", path], capture_output=True, text=True, check=True)
    return res.stdout


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode family, operands) of every instruction, in address order."""
    return [(int(a, 16), op.split(".")[0], rest) for a, op, rest in _INSTR.findall(sass)]


def main_loop(sass: str) -> tuple[int, int]:
    """(instructions, MMAs) of the body of the loop with the most MMA instructions.

    A loop is a backward branch: a branch at address b to a label at address t <= b; its body
    is [t, b]. Among loops with equally many MMAs the shortest (innermost) is taken. A kernel
    without an MMA inside a loop gives (0, 0)."""
    instrs = parse_sass(sass)
    labels: dict[str, int] = {}
    lines = sass.splitlines()
    for i, line in enumerate(lines):
        m = _LABEL.match(line)
        if m:  # the label's address is the next instruction's
            for nxt in lines[i + 1 :]:
                a = _INSTR.match(nxt)
                if a:
                    labels[m.group(1)] = int(a.group(1), 16)
                    break
    best = (0, 0)
    for addr, op, rest in instrs:
        if op not in BRANCH_OPS:
            continue
        t = _TARGET.search(rest)
        if not t or t.group(1) not in labels or labels[t.group(1)] > addr:
            continue
        body = [o for a, o, _ in instrs if labels[t.group(1)] <= a <= addr]
        n_mma = sum(o in MMA_OPS for o in body)
        if n_mma and (n_mma > best[1] or (n_mma == best[1] and len(body) < best[0])):
            best = (len(body), n_mma)
    return best


# ----------------------------------------------------------------------------- occupancy


def occupancy(cc: int, registers: int, shared: int, num_warps: int) -> tuple[int, str]:
    """(CTAs per SM, what limits them) from registers, shared memory and warps per CTA."""
    lim = LIMITS[cc]
    unit = lim.reg_alloc_unit
    regs_per_warp = -(-registers * 32 // unit) * unit
    by = {
        "registers": lim.regs_per_sm // (regs_per_warp * num_warps) if registers else lim.max_ctas_per_sm,
        "shared": lim.smem_per_sm // (shared + lim.smem_reserved_per_cta),
        "warps": lim.max_threads_per_sm // (32 * num_warps),
        "ctas": lim.max_ctas_per_sm,
    }
    limiter = min(by, key=lambda k: by[k])
    return by[limiter], limiter


# ----------------------------------------------------------------------------- one spec


def inspect_spec(spec: aot.AotSpec, cc: int, load: bool = False) -> KernelReport:
    """Compile ``spec`` for sm_<cc> and read its static quality. ``load`` (a GPU of that
    target needed) also loads the cubin and records what the driver reports for it
    (``loaded``: n_regs, n_spills), to confirm the static numbers on a real device."""
    kernel, log = compile_with_log(spec, cc)
    ptxas = parse_ptxas_log(log)
    sass = disassemble(kernel.asm["cubin"])
    instrs = parse_sass(sass)
    ops = Counter(op for _, op, _ in instrs)
    shared = int(kernel.metadata.shared)
    ctas, limiter = occupancy(cc, ptxas["registers"], shared, spec.num_warps)
    loop_n, loop_mma = main_loop(sass)
    lim = LIMITS[cc]
    return KernelReport(
        name=spec.name,
        cc=cc,
        num_warps=spec.num_warps,
        num_stages=spec.num_stages,
        **ptxas,
        shared=shared,
        ctas_per_sm=ctas,
        warps_per_sm=ctas * spec.num_warps,
        occupancy=round(ctas * spec.num_warps * 32 / lim.max_threads_per_sm, 4),
        limiter=limiter,
        instructions=len(instrs),
        mma=sum(ops[o] for o in MMA_OPS),
        async_copy=sum(ops[o] for o in ASYNC_COPY_OPS),
        local=sum(ops[o] for o in LOCAL_OPS),
        loop_instructions=loop_n,
        loop_mma=loop_mma,
        opcodes=dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        loaded=_load(kernel) if load else None,
    )


def _load(kernel) -> dict:
    """Load a compiled kernel on the current GPU: the driver's register and spill counts."""
    kernel._init_handles()  # Triton's own loader (cuModuleLoadData + function attributes)
    return {"n_regs": int(kernel.n_regs), "n_spills": int(kernel.n_spills)}


def tool_versions() -> dict:
    """Which ptxas (per target) and nvdisasm produced the numbers."""
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas

    out = {}
    for cc in aot.TARGETS:
        tool = get_ptxas(cc)
        out[f"ptxas_sm{cc}"] = f"{os.path.basename(tool.path)} {tool.version}"
    out["nvdisasm"] = f"nvdisasm {knobs.nvidia.nvdisasm.version}"
    return out


# ----------------------------------------------------------------------------- the gate

# Kernel families by spec-name prefix; the tensor-core rule covers the attention kernels
# (prefill, split-KV decode, paged) and the visual-mass and received-attention kernels,
# whose score tiles are tl.dot products too.
FAMILIES = ("attn", "paged", "decode_split", "decode_merge", "mass_split", "mass_merge", "received", "vllm_unified")
MMA_FAMILIES = ("attn", "paged", "decode_split", "mass_split", "received", "vllm_unified")
_DTYPE = re.compile(r"_(fp16|bf16|fp32)(?:_|$)")


def family(name: str) -> str:
    """The kernel family of a spec name (``attn_fp16_d128_m64n64_w4s2`` -> ``attn``)."""
    for fam in sorted(FAMILIES, key=len, reverse=True):
        if name == fam or name.startswith(fam + "_"):
            return fam
    raise ValueError(f"spec name {name!r} belongs to no known kernel family {FAMILIES}")


def dtype_of(name: str) -> str | None:
    """The element type a spec name states (fp16, bf16, fp32), or None (merge kernels)."""
    m = _DTYPE.search(name)
    return m.group(1) if m else None


def violations(name: str, cc: int, res: dict) -> list[str]:
    """What the static gate refuses in one compile (``inspect_spec(...).as_dict()`` or an
    ``{"error": ...}`` result): no compile error; no register spill and no local-memory
    instruction (a spill inside the KV loop is local-memory traffic on every tile); registers
    and shared memory within the target's limits; tensor-core MMAs inside the main loop of
    every fp16/bf16 attention kernel. Empty when the compile passes."""
    if "error" in res:
        return [f"compile error: {res['error']}"]
    lim = LIMITS[cc]
    out = []
    if res["spill_stores"] or res["spill_loads"]:
        out.append(f"spills {res['spill_stores']} bytes stored / {res['spill_loads']} loaded per thread")
    if res["local"]:
        out.append(f"{res['local']} local-memory instructions (LDL/STL)")
    if res["registers"] > lim.max_regs_per_thread:
        out.append(f"{res['registers']} registers > {lim.max_regs_per_thread}")
    if res["shared"] > lim.smem_per_cta:
        out.append(f"{res['shared']} bytes of shared memory > {lim.smem_per_cta}")
    if res["ctas_per_sm"] < 1:
        out.append("no CTA fits an SM")
    if family(name) in MMA_FAMILIES and dtype_of(name) in ("fp16", "bf16") and not res["loop_mma"]:
        out.append("no tensor-core MMA in the main loop")
    return out


# ----------------------------------------------------------------------------- every spec

_WORKER = r"""
import json, sys
from vskip_kernels.ops import aot, static
by_name = {s.name: s for s in aot.all_specs()}
res = {}
load = sys.argv[2] == "1"
for name, cc in json.loads(sys.argv[1]):
    try:
        res[f"{name}@{cc}"] = static.inspect_spec(by_name[name], cc, load=load).as_dict()
    except Exception as e:
        res[f"{name}@{cc}"] = {"error": f"{type(e).__name__}: {e}"[-3000:]}
print("@@RESULT@@" + json.dumps(res))
"""


def all_jobs(specs=None) -> list[tuple[str, int]]:
    """(spec name, target) of every registered configuration on every target it launches on."""
    specs = aot.all_specs() if specs is None else specs
    return [(s.name, cc) for s in specs for cc in aot.TARGETS if cc in s.targets]


def inspect_all(jobs: list[tuple[str, int]], workers: int | None = None, load: bool = False) -> dict[str, dict]:
    """``"name@cc" -> KernelReport.as_dict()`` (or ``{"error": ...}``) for every job, compiled
    in ``workers`` subprocesses (default: the CPU count, at most 8); ``load``: see
    ``inspect_spec``. Subprocesses because a
    kernel cannot be compiled under TRITON_INTERPRET, which the test suite sets: the
    interpreter replaces triton.language's own @jit helpers."""
    workers = workers or min(8, os.cpu_count() or 1)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated: silences its warning
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    # Interleaved so that every worker gets a mix of cheap and expensive configurations.
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, json.dumps(jobs[i::workers]), "1" if load else "0"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(workers)
        if jobs[i::workers]
    ]
    results: dict[str, dict] = {}
    for p in procs:
        out, err = p.communicate()
        marker = [line for line in out.splitlines() if line.startswith("@@RESULT@@")]
        if p.returncode != 0 or not marker:
            raise RuntimeError(f"static inspection worker failed (rc={p.returncode}):\n{err[-4000:]}")
        results.update(json.loads(marker[-1][len("@@RESULT@@") :]))
    return results
