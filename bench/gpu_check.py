"""One prepared GPU run: install, versions, the CUDA tests, then the benchmarks, most valuable first.

    bash bench/gpu_check.sh [--out DIR] [--budget SECONDS] [--smoke] [--only STEP ...] [--skip STEP ...]

Made for a GPU machine that has torch, triton and transformers preinstalled but no
package index, and a short lease. Steps, in priority order, each in its own process
with its own time cap, never past what is left of ``--budget``:

  a. ``install`` (``pip install --no-deps --no-build-isolation --no-index -e .``: builds the
     native extension, with its CUDA kernels when nvcc is there), ``env`` (versions, GPU,
     what was built), ``pytest-cuda`` (``pytest python_tests -m cuda``: every Triton kernel
     natively on CUDA tensors, the CUDA schedule kernel, CUDA-graph decode, the baselines),
     ``static-loaded`` (``vskip bench static --load``: every kernel configuration compiled
     for this GPU and loaded, the driver's registers and spills beside the static report's);
  b. ``attention`` and ``visual_mass`` on LLaVA-1.5, LLaVA-NeXT, OneVision and the 32k video;
  c. ``decode``, then ``model`` (TTFT: LLaVA-NeXT-7B, the 32k Qwen2.5-VL video; decode
     eager) and ``model-graphs`` (FlashVLM decode on LLaVA-1.5-7B with CUDA graphs).

A step that fails or runs out of time is recorded and the next one runs; the benchmark
runner saves each suite after every shape, so a stopped suite keeps what it measured.
Everything goes under ``--out`` in at most eight files: ``summary.json``, ``gpu_check.log``,
``junit-cuda.xml`` and ``results/<suite>-<gpu>-<time>.json`` (one per benchmark step, run as
``python -m vskip_kernels.bench``, i.e. ``vskip bench``, on this checkout's package; copy
them to bench/results and run bench/make_table.py, which combines the parts). A compact summary is printed at the end.

``--smoke`` rehearses the same steps on CPU: the install is a dry run, the CUDA tests are
collected (and skipped), and the benchmarks run their tiny smoke shapes.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What each benchmark step runs on a GPU, in priority order (names checked against
# vskip_kernels/bench/cases.py and model_configs.py by the tests, so a renamed shape fails in
# CI, not on the GPU).
ATTENTION_SHAPES = ("llava-next-7b", "qwen25vl-7b-video32k", "llava-ov-7b", "llava15-7b")
MASS_SHAPES = ("mass-n3000", "mass-n32768", "mass-n8000", "mass-n651")
TTFT_MODELS = ("llava-next-7b", "qwen2.5-vl-7b-video32k")  # ShortV, ShortV + V-Skip, V-Skip TTFT targets
DECODE_MODELS = ("llava-1.5-7b",)  # the FlashVLM decode target
DECODE_METHODS = ("dense-sdpa", "flashvlm", "dense-ours", "vskip+flashvlm", "shortv+flashvlm")
MODELS = TTFT_MODELS + DECODE_MODELS
# Fewer timed calls than the runner's defaults: CUDA events make 10 enough, and the lease is short.
KERNEL_TIMING = ("--warmup", "3", "--repeats", "10")
MODEL_TIMING = ("--model-repeats", "2", "--max-new-tokens", "32")

# the benchmark runner (`vskip bench`), run on this checkout's package (PYTHONPATH, see child_env)
BENCH_MODULE = ("-m", "vskip_kernels.bench")

# The static step's report is folded into summary.json and its folder removed, so a device
# run still brings back at most eight files.
STATIC_DIR = "static-report"

DEFAULT_BUDGET_S = 540  # fits a 10-minute command with room for the summary
GRACE_S = 10  # after the cap: SIGINT, SIGTERM, SIGKILL, half of this apart
LOG_TAIL_LINES = 25


@dataclass
class Step:
    name: str
    group: str  # "a", "b" or "c": the priority groups
    cap_s: int  # longest this step may run
    argv: list
    what: str
    env: dict = field(default_factory=dict)
    min_s: int = 15  # not started with less time left than this
    needs_gpu: bool = False  # skipped (with that reason) when no CUDA GPU is present outside --smoke


@dataclass
class Outcome:
    name: str
    group: str
    status: str  # ok | failed | timeout | skipped
    seconds: float
    rc: int | None = None
    detail: str = ""
    files: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- plan


def plan_steps(args) -> list[Step]:
    """The steps of this run, in order (before --only/--skip)."""
    py, smoke = args.python, args.smoke
    results = os.path.join(args.out, "results")
    bench = [py, *BENCH_MODULE]
    common = ["--out", results] + (["--smoke"] if smoke else [])
    steps = []

    install_mode = args.install
    if install_mode == "auto":
        install_mode = "dry-run" if smoke else "real"
    if install_mode != "skip":
        steps.append(
            Step(
                "install",
                "a",
                300,
                [py, os.path.join("bench", "gpu_check.py"), "--do-install", install_mode],
                "editable install without a package index "
                "(builds the native extension; with CUDA kernels when nvcc is there)",
                env={"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "MAX_JOBS": str(os.cpu_count() or 4)},
                min_s=60,
            )
        )
    steps.append(
        Step(
            "env",
            "a",
            60,
            [py, os.path.join("bench", "gpu_check.py"), "--print-env"],
            "versions, GPU, native extension",
            min_s=5,
        )
    )
    junit = os.path.join(args.out, "junit-cuda.xml")
    pytest = [
        py,
        "-m",
        "pytest",
        "python_tests",
        "-m",
        "cuda",
        "-q",
        "-rfEs",
        "-p",
        "no:cacheprovider",
        "--continue-on-collection-errors",
        "--durations=15",
        f"--junitxml={junit}",
    ]
    if args.pytest_workers > 0:
        pytest += ["-n", str(args.pytest_workers)]
    if args.test_timeout > 0:
        pytest += [f"--timeout={args.test_timeout}"]
    steps.append(
        Step(
            "pytest-cuda",
            "a",
            240,
            pytest,
            "pytest -m cuda: native Triton kernels on CUDA tensors, CUDA schedule kernel, "
            "CUDA-graph decode, FlexAttention/flash-attn baselines",
            min_s=30,
        )
    )
    # The static report on this GPU's own target, each kernel loaded: the driver's n_regs /
    # n_spills beside ptxas's and the committed report's (smoke: one small kernel family, no load)
    static = ["static", "--load"] if not smoke else ["static", "--only", "mass_merge", "--targets", "80"]
    steps.append(
        Step(
            "static-loaded",
            "a",
            120,
            bench + static + ["--out", os.path.join(args.out, STATIC_DIR)],
            "static kernel report on this GPU's target, every configuration loaded: "
            "driver n_regs/n_spills vs ptxas and the committed report",
            needs_gpu=True,
            min_s=30,
        )
    )
    shapes = lambda names: [] if smoke else ["--shapes", *names]
    timing = [] if smoke else list(KERNEL_TIMING)
    steps.append(
        Step(
            "attention",
            "b",
            270,
            bench + ["attention"] + shapes(ATTENTION_SHAPES) + timing + common,
            "prefill attention: LLaVA-1.5, LLaVA-NeXT, OneVision, 32k video",
            needs_gpu=True,
            min_s=40,
        )
    )
    steps.append(
        Step(
            "visual_mass",
            "b",
            120,
            bench + ["visual_mass"] + shapes(MASS_SHAPES) + timing + common,
            "visual attention mass at N 651, 3k, 8k, 32k",
            needs_gpu=True,
            min_s=30,
        )
    )
    steps.append(
        Step(
            "decode",
            "c",
            90,
            bench + ["decode"] + timing + common,
            "decode attention against 4k-32k caches",
            needs_gpu=True,
            min_s=30,
        )
    )
    models = lambda names: [] if smoke else ["--models", *names]
    model_timing = [] if smoke else list(MODEL_TIMING)
    # TTFT targets first: prefill does not depend on how decode runs, and eager decode
    # spares a CUDA-graph compile per method
    steps.append(
        Step(
            "model",
            "c",
            240,
            bench + ["model"] + models(TTFT_MODELS) + ["--decode-mode", "eager"] + model_timing + common,
            "model level, TTFT targets: " + ", ".join(TTFT_MODELS),
            needs_gpu=True,
            min_s=60,
        )
    )
    # the decode target: CUDA-graph decode, FlashVLM against dense first
    steps.append(
        Step(
            "model-graphs",
            "c",
            300,
            bench
            + ["model"]
            + models(DECODE_MODELS)
            + ["--decode-mode", "graphs", "--methods", *DECODE_METHODS]
            + model_timing
            + common,
            "model level, CUDA-graph decode target: " + ", ".join(DECODE_MODELS),
            needs_gpu=True,
            min_s=90,
        )
    )
    return steps


def is_benchmark(step: Step) -> bool:
    """Whether the step runs a benchmark suite (and so must write a result file); the static
    report is not one (its result is folded into summary.json)."""
    return tuple(step.argv[1:3]) == BENCH_MODULE and step.argv[3:4] != ["static"]


def select(steps: list[Step], only, skip) -> list[Step]:
    names = [s.name for s in steps]
    for n in list(only or []) + list(skip or []):
        if n not in names:
            raise SystemExit(f"gpu_check: unknown step {n!r}; steps are {', '.join(names)}")
    return [s for s in steps if (not only or s.name in only) and s.name not in (skip or [])]


# ----------------------------------------------------------------------------- running


def child_env(args, extra: dict) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"  # random-weight models built in code: nothing to download, and no network
    env["TRANSFORMERS_OFFLINE"] = "1"
    if not args.smoke:
        env.pop("TRITON_INTERPRET", None)  # the point of the run: native kernels, not the interpreter
    env.update(extra)
    return env


def _default_sigint():
    """In the child, before exec: SIGINT back to its default. A shell starts background jobs
    with SIGINT ignored, and an ignored signal survives exec; Python then installs no
    KeyboardInterrupt handler, and a step stopped at its cap would lose its junit report."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_step(step: Step, cap_s: float, log, args) -> tuple[int | None, bool, float, list[str]]:
    """Run ``step.argv`` for at most ``cap_s`` seconds, output appended to ``log``.

    Returns (exit code or None when stopped, timed out, seconds, last lines of output).
    A step that outlives its cap gets SIGINT (its process group), then SIGTERM, then SIGKILL.
    """
    log.write(f"\n===== {step.name}: {step.what}\n$ {shlex.join(step.argv)}\n")
    log.flush()
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(
            step.argv,
            cwd=REPO,
            env=child_env(args, step.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
            preexec_fn=_default_sigint,
        )
    except OSError as exc:
        msg = f"could not start: {exc}"
        log.write(msg + "\n")
        return 127, False, time.monotonic() - t0, [msg]
    lines: collections.deque = collections.deque(maxlen=400)

    def pump():  # a thread, so a step that prints nothing for a while cannot stall the cap
        for line in proc.stdout:
            log.write(line)
            log.flush()
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(cap_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        log.write(f"\n[gpu_check] {step.name}: cap of {cap_s:.0f} s reached, stopping it\n")
        # SIGINT first: pytest then still writes its junit report, and Python steps unwind
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            _signal_group(proc, sig)
            try:
                proc.wait(GRACE_S / 2)
                break
            except subprocess.TimeoutExpired:
                continue
        if proc.poll() is None:
            proc.wait()
    _signal_group(proc, signal.SIGKILL)  # anything the step left running in its group
    reader.join(5)
    tail = [ln for ln in lines if ln.strip()][-LOG_TAIL_LINES:]
    return (None if timed_out else proc.returncode), timed_out, time.monotonic() - t0, tail


def _signal_group(proc, sig) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ----------------------------------------------------------------------------- reading results


def junit_counts(path: str) -> dict | None:
    """passed/failed/errors/skipped and the failing test ids from a pytest junit file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failing = []
    for case in root.iter("testcase"):
        if not case.get("name"):  # the test an interrupt stopped: pytest writes an empty entry
            continue
        counts["tests"] += 1
        cid = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failures"] += 1
            failing.append(cid)
        elif case.find("error") is not None:
            counts["errors"] += 1
            failing.append(cid)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failing"] = failing
    return counts


def result_files(out: str) -> set:
    return set(
        glob.glob(os.path.join(out, "results", "*.json")) + glob.glob(os.path.join(out, "results", "smoke", "*.json"))
    )


def describe_result(path: str) -> dict:
    """What a benchmark JSON holds: cases, measured results, skips and target checks."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        return {"file": path, "error": f"unreadable: {exc}"}
    cases = doc.get("cases", [])
    checks = doc.get("checks", [])
    applies = [c for c in checks if c.get("target_applies", True)]
    return {
        "file": path,
        "suite": doc.get("suite"),
        "complete": doc.get("complete", True),
        "shapes": len(doc.get("shapes", [])),
        "cases": len(cases),
        "results": sum(len(c.get("results", [])) for c in cases),
        "skipped": sorted({f"{s['backend']}: {s['reason'][:100]}" for c in cases for s in c.get("skipped", [])}),
        "checks_pass": sum(1 for c in applies if c.get("passed") is True),
        "checks_fail": [
            f"{c['name']} [{c.get('shape') or c.get('model') or ''}] = {_num(c.get('value'))} (target {c['target']})"
            for c in applies
            if c.get("passed") is False
        ],
    }


def fold_static_report(out: Outcome, folder: str) -> None:
    """The static step's JSON, compacted into the step's summary info; the folder is removed."""
    import shutil

    paths = sorted(glob.glob(os.path.join(folder, "static-*.json")))
    if paths:
        with open(paths[-1]) as f:
            doc = json.load(f)
        kernels = doc.get("kernels", {})
        lv = doc.get("loaded_vs_static") or {}
        keep = ("registers", "spill_stores", "spill_loads", "local", "shared", "loop_instructions", "loaded")
        d = {
            "file": os.path.basename(paths[-1]),
            "compiles": len(kernels),
            "failing": sorted(k for k, r in kernels.items() if r.get("violations")),
            "loaded": lv.get("compared", 0),
            "loaded_mismatch": lv.get("mismatch_here", []) + lv.get("mismatch_committed", []),
            "loaded_vs_static": doc.get("loaded_vs_static"),
            "kernels": {
                k: {**{f: r.get(f) for f in keep}, "violations": r.get("violations")} for k, r in kernels.items()
            },
        }
        out.info["static"] = d
        out.detail = (
            f"{d['compiles']} compiles, {len(d['failing'])} failing the gate, {d['loaded']} loaded, "
            f"{len(d['loaded_mismatch'])} differing from the static report"
        )
        if d["failing"] or d["loaded_mismatch"]:
            out.status = "failed"
    elif out.status == "ok":
        out.status, out.detail = "failed", "exited 0 but wrote no static report"
    shutil.rmtree(folder, ignore_errors=True)


def _num(x) -> str:
    return "—" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))


# ----------------------------------------------------------------------------- install step

PIP_INSTALL = ("-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--use-pep517", "-e", ".")


def do_install(mode: str) -> int:
    """The ``install`` step. ``real``: the editable install (native extension built against
    the torch already there), falling back to building the extension in place when pip
    fails; then checks what got built. ``dry-run``: pip resolves and prepares the package
    metadata without an index, and installs nothing."""
    py = sys.executable
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if nvcc and os.path.exists(nvcc):
        print(f"install: nvcc found ({nvcc}); the native extension is built with its CUDA kernels", flush=True)
    else:
        print(
            "install: no nvcc (CUDA_HOME not found); the native extension is built for CPU only, and "
            "plan_schedule on CUDA tensors uses its PyTorch fallback",
            flush=True,
        )
    if mode == "dry-run":
        cmd = [py, *PIP_INSTALL[:3], "--dry-run", *PIP_INSTALL[3:]]
        print("$ " + shlex.join(cmd), flush=True)
        return subprocess.call(cmd, cwd=REPO)
    cmd = [py, *PIP_INSTALL]
    print("$ " + shlex.join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=REPO)
    if rc != 0:
        cmd = [py, "setup.py", "build_ext", "--inplace"]
        print(
            f"install: pip failed (exit {rc}); building the extension in place instead\n$ {shlex.join(cmd)}", flush=True
        )
        rc = subprocess.call(cmd, cwd=REPO)
    check = (
        "import torch, vskip_kernels; from vskip_kernels import _native; "
        "print('install: vskip_kernels', vskip_kernels.__version__, 'from', vskip_kernels.__file__); "
        "print('install: native extension', 'loaded' if _native.available() else 'NOT loaded', "
        "'with CUDA schedule kernel' if _native.available() and "
        "torch._C._dispatch_has_kernel_for_dispatch_key('vskip::plan_schedule', 'CUDA') else '')"
    )
    ok = subprocess.call([py, "-c", check], cwd=REPO)
    return rc or ok


# ----------------------------------------------------------------------------- env step


def print_env() -> int:
    """The ``env`` step: one JSON object on stdout (run in a child so a broken import is a
    recorded failure, not a crash of the driver)."""
    info: dict = {"python": sys.version.split()[0], "executable": sys.executable}
    for mod in ("torch", "triton", "transformers", "flash_attn", "pytest", "xdist", "hypothesis", "vskip_kernels"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "present")
        except Exception as exc:
            info[mod] = f"not importable ({type(exc).__name__})"
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu=p.name,
            capability="sm%d%d" % (p.major, p.minor),
            sm_count=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
            gpu_count=torch.cuda.device_count(),
        )
    from torch.utils.cpp_extension import CUDA_HOME

    info["cuda_home"] = CUDA_HOME is not None
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    info["nvcc"] = _first_line([nvcc, "--version"], last=True) if nvcc and os.path.exists(nvcc) else None
    info["driver"] = _first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    from vskip_kernels import _native

    info["native_extension"] = _native.available()
    info["native_cuda_schedule"] = bool(
        _native.available() and torch._C._dispatch_has_kernel_for_dispatch_key("vskip::plan_schedule", "CUDA")
    )
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(info))
    return 0


def _first_line(cmd, last=False):
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln.strip() for ln in res.stdout.splitlines() if ln.strip()]
    if res.returncode != 0 or not lines:
        return None
    return lines[-1] if last else lines[0]


# ----------------------------------------------------------------------------- summary


def judge(step: Step, rc, timed_out, seconds, tail, args, before: set) -> Outcome:
    status = "timeout" if timed_out else ("ok" if rc == 0 else "failed")
    out = Outcome(step.name, step.group, status, round(seconds, 1), rc)
    if step.name == "env" and rc == 0:
        line = next((ln for ln in reversed(tail) if ln.startswith("{")), None)
        try:
            out.info = json.loads(line) if line else {}
        except json.JSONDecodeError:
            out.info = {}
        e = out.info
        out.detail = (
            f"{e.get('gpu') or 'no GPU'}; torch {e.get('torch')}, triton {e.get('triton')}, "
            f"transformers {e.get('transformers')}; native extension "
            f"{'with CUDA schedule kernel' if e.get('native_cuda_schedule') else 'CPU only' if e.get('native_extension') else 'absent'}"
        )
    elif step.name == "pytest-cuda":
        counts = junit_counts(os.path.join(args.out, "junit-cuda.xml"))
        if counts:
            out.info = counts
            out.detail = (
                f"{counts['passed']} passed, {counts['failures'] + counts['errors']} failed, "
                f"{counts['skipped']} skipped"
            )
            if rc == 5 or counts["tests"] == 0:
                out.status, out.detail = "failed", "no test collected"
        elif status != "timeout":
            out.status = "failed"
            out.detail = "no junit report (collection error?)"
    elif step.name == "install":
        said = [ln for ln in tail if ln.startswith("install: native extension")]
        if "dry-run" in step.argv:
            out.detail = "dry run: pip prepares the package without an index" if rc == 0 else out.detail
        elif said:
            out.detail = said[-1][len("install: ") :].strip()
            if "NOT loaded" in out.detail:
                out.status = "failed"
    elif step.name == "static-loaded":
        fold_static_report(out, os.path.join(args.out, STATIC_DIR))
    new = sorted(result_files(args.out) - before)
    if new:
        out.files = [os.path.relpath(p, args.out) for p in new]
        out.info["results"] = [describe_result(p) for p in new]
        parts = []
        for r in out.info["results"]:
            if "error" in r:
                parts.append(r["error"])
                continue
            parts.append(
                f"{r['cases']} cases{'' if r['complete'] else ' (partial)'}, "
                f"targets {r['checks_pass']} met / {len(r['checks_fail'])} missed"
            )
        out.detail = "; ".join(parts)
    elif is_benchmark(step) and status == "ok":
        out.status, out.detail = "failed", "exited 0 but wrote no result file"
    if out.status in ("failed", "timeout") and not out.detail:
        out.detail = tail[-1][:160] if tail else ""
    return out


def summary_text(outcomes: list[Outcome], env: dict, budget: float, used: float, smoke: bool) -> str:
    head = (
        f"gpu_check{' --smoke' if smoke else ''}: {env.get('gpu') or 'no GPU'}; torch {env.get('torch', '?')}, "
        f"triton {env.get('triton', '?')}, transformers {env.get('transformers', '?')}; "
        f"{used:.0f} of {budget:.0f} s"
    )
    lines = [head]
    for o in outcomes:
        lines.append(f"  {o.status.upper():8s} {o.group} {o.name:12s} {o.seconds:6.0f} s  {o.detail}")
        if o.name == "pytest-cuda" and o.info.get("failing"):
            lines += [f"           failing: {t}" for t in o.info["failing"][:12]]
            if len(o.info["failing"]) > 12:
                lines.append(f"           ... and {len(o.info['failing']) - 12} more (junit-cuda.xml)")
        for r in o.info.get("results", []):
            lines += [f"           missed: {m}" for m in r.get("checks_fail", [])[:8]]
            lines += [f"           skipped: {s}" for s in r.get("skipped", [])[:6]]
    bad = [o.name for o in outcomes if o.status in ("failed", "timeout")]
    lines.append("  all steps ok" if not bad else f"  needs a look: {', '.join(bad)} (gpu_check.log)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output folder (default: $OUT when set, else bench/gpu_check_out)")
    p.add_argument(
        "--budget", type=float, default=DEFAULT_BUDGET_S, help="total seconds for all steps (default: %(default)s)"
    )
    p.add_argument("--smoke", action="store_true", help="CPU rehearsal: dry-run install, tiny benchmark shapes")
    p.add_argument("--only", nargs="+", default=None, metavar="STEP", help="run only these steps")
    p.add_argument("--skip", nargs="+", default=None, metavar="STEP", help="leave these steps out")
    p.add_argument(
        "--install",
        choices=("auto", "real", "dry-run", "skip"),
        default="auto",
        help="auto: a real editable install on the GPU, a dry run with --smoke",
    )
    p.add_argument("--python", default=sys.executable, help="interpreter for every step (default: this one)")
    p.add_argument(
        "--pytest-workers",
        type=int,
        default=None,
        help="pytest-xdist workers for the CUDA tests (compiling kernels dominates their time); "
        "default: up to 8 when xdist is installed and a GPU is present, else 0",
    )
    p.add_argument(
        "--test-timeout",
        type=int,
        default=None,
        help="per-test timeout (pytest-timeout); default 150 s when installed, else none",
    )
    p.add_argument("--list", action="store_true", help="print the planned steps and exit")
    p.add_argument("--print-env", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--do-install", choices=("real", "dry-run"), default=None, help=argparse.SUPPRESS)
    return p


def _importable(py: str, mod: str) -> bool:
    try:
        return subprocess.run([py, "-c", f"import {mod}"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _has_gpu() -> bool:
    try:
        res = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0 and "GPU" in res.stdout


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_env:
        return print_env()
    if args.do_install:
        return do_install(args.do_install)
    args.out = os.path.abspath(args.out or os.environ.get("OUT") or os.path.join(REPO, "bench", "gpu_check_out"))
    gpu = _has_gpu()
    if args.pytest_workers is None:
        args.pytest_workers = (
            min(8, max(1, (os.cpu_count() or 2) // 2)) if gpu and _importable(args.python, "xdist") else 0
        )
    if args.test_timeout is None:
        args.test_timeout = 150 if _importable(args.python, "pytest_timeout") else 0
    steps = select(plan_steps(args), args.only, args.skip)
    if args.list:
        for s in steps:
            print(f"{s.group} {s.name:12s} cap {s.cap_s:4d} s  {shlex.join(s.argv)}")
        return 0
    os.makedirs(args.out, exist_ok=True)
    start = time.monotonic()
    outcomes: list[Outcome] = []
    env: dict = {}
    with open(os.path.join(args.out, "gpu_check.log"), "a") as log:
        log.write(
            f"===== gpu_check {'--smoke ' if args.smoke else ''}budget {args.budget:.0f} s, "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
        )
        for step in steps:
            left = args.budget - (time.monotonic() - start)
            if step.needs_gpu and not args.smoke and not gpu:
                outcomes.append(Outcome(step.name, step.group, "skipped", 0.0, detail="no CUDA GPU (nvidia-smi)"))
                continue
            if left < step.min_s:
                outcomes.append(
                    Outcome(
                        step.name,
                        step.group,
                        "skipped",
                        0.0,
                        detail=f"budget spent ({left:.0f} s left, needs {step.min_s})",
                    )
                )
                continue
            cap = min(step.cap_s, left)
            print(f"[gpu_check] {step.name} (cap {cap:.0f} s): {step.what}", flush=True)
            before = result_files(args.out)
            rc, timed_out, secs, tail = run_step(step, cap, log, args)
            o = judge(step, rc, timed_out, secs, tail, args, before)
            if step.name == "env":
                env = o.info
            outcomes.append(o)
            print(f"[gpu_check] {step.name}: {o.status} in {o.seconds:.0f} s  {o.detail}", flush=True)
            if o.status in ("failed", "timeout"):
                for ln in tail[-12:]:
                    print(f"    | {ln[:200]}", flush=True)
        used = time.monotonic() - start
        text = summary_text(outcomes, env, args.budget, used, args.smoke)
        log.write("\n" + text + "\n")
    doc = {
        "format": "vskip-gpu-check/1",
        "smoke": args.smoke,
        "budget_s": args.budget,
        "used_s": round(used, 1),
        "env": env,
        "steps": [o.__dict__ for o in outcomes],
    }
    tmp = os.path.join(args.out, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(args.out, "summary.json"))
    print(text, flush=True)
    return 0 if all(o.status in ("ok", "skipped") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
