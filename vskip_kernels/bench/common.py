"""Shared pieces of the benchmark suites: environment record, timing, FLOP counts, JSON output.

Every number written by a suite comes from a measurement taken in the same run;
ratios (``speedup_vs``) are computed from those measurements, never typed in.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# the source tree this package was imported from, when it is one (see source_root)
_TREE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULT_FIELDS = ("backend", "ms_median", "ms_p20", "ms_p80", "tflops", "peak_mem_bytes", "speedup_vs")


# ----------------------------------------------------------------------------- environment


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def source_root() -> str | None:
    """The git work tree this package was imported from (a source checkout or an editable
    install), else None: an installed copy has no commit of its own to report, even when its
    site-packages happens to lie inside some git repository."""
    if not (os.path.isdir(os.path.join(_TREE, "bench")) and os.path.isfile(os.path.join(_TREE, "pyproject.toml"))):
        return None
    top = _run(["git", "rev-parse", "--show-toplevel"], cwd=_TREE)
    if top is None or os.path.realpath(top) != os.path.realpath(_TREE):
        return None
    return _TREE


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the source checkout; off a checkout the commit named by
    ``VSKIP_GIT_COMMIT`` (a copy of the tree without .git, e.g. on a device machine) or None,
    and dirty None. Never raises."""
    root = source_root()
    commit = _run(["git", "rev-parse", "HEAD"], cwd=root) if root else None
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root) if root else None
    return commit or os.environ.get("VSKIP_GIT_COMMIT") or None, None if status is None else bool(status)


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
    except Exception:  # an optional package that is absent or broken is simply not recorded
        return None
    return getattr(m, "__version__", "unknown")


def environment(device: torch.device) -> dict:
    """What the numbers were measured on. Deliberately holds no host name or user name."""
    env = {
        "device": device.type,
        "gpu": None,
        "gpu_capability": None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "driver_version": None,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "os": platform.system(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "flash_attn": _version("flash_attn"),
        "vskip_kernels": _version("vskip_kernels"),
        # a copy of the tree without .git (a device machine) names its commit in VSKIP_GIT_COMMIT
        "git_commit": None,
        "git_dirty": None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    env["git_commit"], env["git_dirty"] = git_state()
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        env["gpu"] = torch.cuda.get_device_name(idx)
        env["gpu_capability"] = "sm%d%d" % torch.cuda.get_device_capability(idx)
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        env["driver_version"] = smi.splitlines()[0].strip() if smi else None
    return env


def device_slug(env: dict) -> str:
    name = env.get("gpu") or "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown"


# ----------------------------------------------------------------------------- timing


@dataclass
class Timing:
    ms_median: float
    ms_p20: float
    ms_p80: float
    samples: list[float]


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples_ms: list[float]) -> Timing:
    if not samples_ms:
        raise ValueError("summarize needs at least one timing sample")
    return Timing(
        statistics.median(samples_ms), _quantile(samples_ms, 0.2), _quantile(samples_ms, 0.8), list(samples_ms)
    )


class _L2Flusher:
    """Writes a buffer larger than any current GPU's L2 so each repeat starts cold."""

    def __init__(self, device: torch.device, nbytes: int = 256 << 20):
        self.buf = torch.empty(nbytes // 4, dtype=torch.int32, device=device)

    def __call__(self):
        self.buf.zero_()


def time_fn(
    fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeats: int = 10, flush_l2: bool = False
) -> Timing:
    """Median and p20/p80 of ``repeats`` calls after ``warmup`` calls.

    CUDA: one pair of events per call, so launch gaps between repeats are not
    counted and the L2 flush (optional) stays outside the timed interval.
    CPU: time.perf_counter around each call.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        flusher = _L2Flusher(device) if flush_l2 else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        torch.cuda.synchronize(device)
        for s, e in zip(starts, ends):
            if flusher is not None:
                flusher()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples)


def wall_ms(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Host wall time of one call that synchronizes (e.g. generate), in ms, and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3, out


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated by torch during one call (inputs included); None on CPU,
    where no allocator statistic covers torch's tensors."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- FLOPs


def allowed_entries(kind: torch.Tensor, nq: int, policy: str, visual_self: bool = True) -> int:
    """Exact number of allowed (query, key) pairs summed over the batch, in O(B * N).

    kind [B, Nk] int8 (0 pad, 1 text, 2 visual, see reference.token_kind); queries are
    the last nq positions. Matches reference.allowed_mask(...).sum() without the N x N mask.
    """
    b, nk = kind.shape
    kind = kind.long()
    real = (kind != 0).long().cumsum(1)  # real keys at positions <= p
    text = (kind == 1).long().cumsum(1)
    qk = kind[:, nk - nq :]
    real_q, text_q = real[:, nk - nq :], text[:, nk - nq :]
    if policy == "dense":
        per_row = torch.where(qk != 0, real_q, torch.zeros_like(real_q))
    elif policy == "vskip":
        vis_row = text_q + (1 if visual_self else 0)
        per_row = torch.where(qk == 1, real_q, torch.where(qk == 2, vis_row, torch.zeros_like(real_q)))
    elif policy == "frozen":
        per_row = torch.where(qk == 1, real_q, torch.zeros_like(real_q))
    else:
        raise ValueError(f"policy must be 'dense', 'vskip' or 'frozen', got {policy!r}")
    return int(per_row.sum())


def attention_flops(entries: int, num_q_heads: int, head_dim: int) -> int:
    """QK^T and PV: 2 * D multiply-adds each per allowed entry and head."""
    return 4 * head_dim * entries * num_q_heads


def tflops(flops: int, ms: float) -> float | None:
    return None if ms <= 0 else flops / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------- results


def result_entry(
    backend: str,
    timing: Timing,
    *,
    flops: int | None = None,
    dense_flops: int | None = None,
    peak_mem_bytes: int | None = None,
    **extra,
) -> dict:
    entry = {
        "backend": backend,
        "ms_median": timing.ms_median,
        "ms_p20": timing.ms_p20,
        "ms_p80": timing.ms_p80,
        "repeats": len(timing.samples),
        "tflops": tflops(flops, timing.ms_median) if flops is not None else None,
        "tflops_dense_equiv": tflops(dense_flops, timing.ms_median) if dense_flops is not None else None,
        "peak_mem_bytes": peak_mem_bytes,
        "speedup_vs": {},
    }
    entry.update(extra)
    return entry


def fill_speedups(results: list[dict], key: str = "ms_median") -> list[dict]:
    """speedup_vs[other] = other's time / this time, for every other backend of the same case."""
    for r in results:
        r["speedup_vs"] = {
            o["backend"]: o[key] / r[key] for o in results if o is not r and r[key] and o[key] is not None
        }
    return results


def measure(
    backend: str,
    build: Callable[[], Callable[[], object]],
    device: torch.device,
    args,
    *,
    skipped: list,
    results: list,
    **entry_kw,
) -> dict | None:
    """Build the callable and time it; an out-of-memory, a missing package or an unsupported
    configuration (raised while building or running) becomes a recorded skip with its reason."""
    try:
        fn = build()
        timing = time_fn(fn, device, warmup=args.warmup, repeats=args.repeats, flush_l2=args.flush_l2)
        peak = peak_memory(fn, device)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "(no message)"
        reason = ("out of memory: " if is_oom(exc) else f"{type(exc).__name__}: ") + msg
        skipped.append({"backend": backend, "reason": reason})
        fn = None
        free_memory(device)
        return None
    entry = result_entry(backend, timing, peak_mem_bytes=peak, **entry_kw)
    results.append(entry)
    del fn
    free_memory(device)
    return entry


def find(results: list[dict], backend: str) -> dict | None:
    return next((r for r in results if r["backend"] == backend), None)


def timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def result_path(out_dir: str, suite: str, env: dict, created_utc: str) -> str:
    """``<out_dir>/<suite>-<device-slug>-<timestamp>.json``, with a numeric suffix when taken."""
    base = f"{suite}-{device_slug(env)}-{created_utc}"
    path = os.path.join(out_dir, base + ".json")
    n = 1
    while os.path.exists(path):  # two suites finishing within one second must not overwrite each other
        path = os.path.join(out_dir, f"{base}-{n}.json")
        n += 1
    return path


def write_results(
    out_dir: str,
    suite: str,
    env: dict,
    shapes: list,
    cases: list,
    *,
    smoke: bool,
    checks: list | None = None,
    settings: dict | None = None,
    notes: list | None = None,
    path: str | None = None,
    created_utc: str | None = None,
    complete: bool = True,
) -> str:
    """Write the suite's result document and return its path.

    Without ``path``: a new ``<out_dir>/<suite>-<device-slug>-<timestamp>.json``. With it (and
    the ``created_utc`` it was named after) the same file is rewritten: the runner saves each
    suite after every shape with ``complete=False``, so a run stopped by a time limit keeps
    what it measured. The file is replaced atomically, never left half written.
    """
    os.makedirs(out_dir, exist_ok=True)
    created_utc = created_utc or timestamp()
    doc = {
        "format": "vskip-bench/1",
        "suite": suite,
        "smoke": bool(smoke),
        "complete": bool(complete),
        "created_utc": created_utc,
        "env": env,
        "settings": settings or {},
        "shapes": shapes,
        "cases": cases,
        "checks": checks or [],
        "notes": notes or [],
    }
    path = path or result_path(out_dir, suite, env, created_utc)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _json_default(o):
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    if isinstance(o, torch.device):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__} in benchmark results")


def check(name: str, value: float | None, target: str, passed: bool | None, **detail) -> dict:
    """A target check computed from measured values; passed None when a needed number is missing."""
    return {"name": name, "value": value, "target": target, "passed": passed, **detail}


def run_shapes(shapes: list, args, device: torch.device, dtype: torch.dtype, run_shape, shape_checks):
    """(shape descriptions, cases, checks) of a suite: ``run_shape`` on each of
    ``shapes`` (only those named by ``args.shapes`` when given, in that order), ``shape_checks``
    on each shape's cases."""
    if args.shapes:  # in the order asked for: a run stopped by a time limit has done the first ones
        by_name = {s.name: s for s in shapes}
        shapes = [by_name[n] for n in dict.fromkeys(args.shapes) if n in by_name]
    all_cases, checks = [], []
    done = []
    for shape in shapes:
        sc = run_shape(shape, args, device, dtype)
        all_cases.extend(sc)
        checks.extend(shape_checks(shape, sc))
        done.append(shape.describe())
        checkpoint(args, done, all_cases, checks)
    return [s.describe() for s in shapes], all_cases, checks


def checkpoint(args, shapes: list, cases: list, checks: list) -> None:
    """Save a suite's results so far (``args.checkpoint``, set by the runner; absent when a
    suite is called directly)."""
    save = getattr(args, "checkpoint", None)
    if save is not None:
        save(shapes, cases, checks)
