"""``vskip bench static``: the static kernel report, no GPU needed.

Compiles every registered Triton kernel configuration (``ops.aot.all_specs``) for every
target it launches on (sm80, sm86, sm89, sm90) and reads what the GPU would run
(``ops.static``): registers, spill stores/loads and stack frame from ``ptxas -v``, shared
memory, theoretical occupancy, the SASS instruction mix (tensor-core MMAs, asynchronous K/V
copies, local-memory instructions, the main KV loop's instruction count) and the gate's
verdict (``static.violations``, the rules the compile gate test enforces).

With ``--vllm-python PATH`` (a Python where vLLM is importable, e.g. the vLLM test
environment) vLLM's own Triton paged attention is compiled there at the shapes our paged
kernel serves (``bench/vllm_peer.py``) and set beside ours; ``--peer FILE`` reuses such a
result. Writes ``<out>/static-triton<version>-<UTC timestamp>.json``; in a source checkout
it also regenerates the tables in ``bench/README.md`` (``render_readme``, also run by
``bench/make_table.py``). The numbers predict; they do not time anything.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import subprocess
import sys
import time

FORMAT = "vskip-static/1"
START, END = "<!-- static:start -->", "<!-- static:end -->"
NO_REPORT = "_No static report yet._ Run `vskip bench static` in a source checkout."


# ----------------------------------------------------------------------------- running


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vskip bench static", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="results directory (default: as for the other suites)")
    p.add_argument("--workers", type=int, default=None, help="compile subprocesses (default: CPU count, at most 8)")
    p.add_argument("--only", nargs="+", default=None, metavar="PREFIX", help="only specs whose name starts so")
    p.add_argument(
        "--vllm-python", default=None, metavar="PYTHON", help="compile vLLM's paged kernel as a peer in this Python"
    )
    p.add_argument("--peer", default=None, metavar="FILE", help="a peer result written by bench/vllm_peer.py")
    p.add_argument("--targets", nargs="+", type=int, default=None, metavar="CC", help="only these targets, e.g. 80 90")
    p.add_argument(
        "--load",
        action="store_true",
        help="on a GPU: compile for its own target only, load each kernel and record the driver's "
        "n_regs/n_spills beside ptxas's and the newest committed report's",
    )
    p.add_argument("--no-readme", action="store_true", help="do not regenerate bench/README.md's tables")
    return p


def _device_target() -> int:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--load needs a CUDA GPU (it loads each compiled kernel on it)")
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def compare_loaded(kernels: dict[str, dict], committed: dict | None) -> dict:
    """For each loaded kernel: does the driver's n_regs / n_spills match ptxas's report of the
    same compile, and the committed report's (another machine, maybe another Triton)?"""
    here: list[str] = []
    committed_diff: list[str] = []
    missing: list[str] = []
    compared = 0
    ref = (committed or {}).get("kernels", {})
    for key, r in kernels.items():
        got = r.get("loaded")
        if not got:
            continue
        compared += 1
        if got["n_regs"] != r["registers"] or bool(got["n_spills"]) != bool(r["spill_stores"]):
            here.append(key)
        c = ref.get(key)
        if c is None or "registers" not in c:
            missing.append(key)
        elif got["n_regs"] != c["registers"] or bool(got["n_spills"]) != bool(c["spill_stores"]):
            committed_diff.append(
                f"{key}: loaded {got}, committed {c['registers']} regs, {c['spill_stores']} spill bytes"
            )
    return {
        "compared": compared,
        "mismatch_here": here,
        "mismatch_committed": committed_diff,
        "not_in_committed": missing,
    }


def _environment() -> dict:
    from ..ops import static
    from .common import _version, git_state

    commit, dirty = git_state()
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "triton": _version("triton"),
        "vskip_kernels": _version("vskip_kernels"),
        "git_commit": commit,
        "git_dirty": dirty,
        "tools": static.tool_versions(),
    }


def annotate(kernels: dict[str, dict]) -> dict[str, dict]:
    """Each ``name@cc`` result with its family, dtype, target and the gate's verdict."""
    from ..ops import static

    out = {}
    for key, res in kernels.items():
        name, cc = key.rsplit("@", 1)
        out[key] = {
            **res,
            "name": name,
            "cc": int(cc),
            "family": static.family(name),
            "dtype": static.dtype_of(name),
            "violations": static.violations(name, int(cc), res),
        }
    return out


def summarize(kernels: dict[str, dict]) -> dict:
    """family -> "sm<cc>" -> compiles, failing (gate violations), max registers, least
    occupancy (warps per SM)."""
    out: dict = {}
    for r in kernels.values():
        s = out.setdefault(r["family"], {}).setdefault(
            f"sm{r['cc']}", {"compiles": 0, "failing": 0, "max_registers": 0, "min_warps_per_sm": None}
        )
        s["compiles"] += 1
        s["failing"] += bool(r["violations"])
        if "registers" in r:
            s["max_registers"] = max(s["max_registers"], r["registers"])
            w = r["warps_per_sm"]
            s["min_warps_per_sm"] = w if s["min_warps_per_sm"] is None else min(s["min_warps_per_sm"], w)
    return out


def run_peer(python: str) -> dict:
    """vLLM's paged kernel compiled in ``python`` (``python -m vskip_kernels.bench.vllm_peer``)."""
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "peer.json")
        res = subprocess.run(
            [python, "-m", "vskip_kernels.bench.vllm_peer", "--out", path], env=env, capture_output=True, text=True
        )
        if res.returncode != 0:
            raise RuntimeError(f"the vLLM peer compile failed in {python}:\n{res.stderr[-3000:]}")
        with open(path) as f:
            return json.load(f)


def main(argv=None, *, default_out: str = "vskip_bench_results", source_checkout: bool = False) -> str:
    """Run the report; returns the JSON file's path. The runner (``run.main``) passes its
    results folder and whether the current directory is a source checkout, where
    ``bench/README.md``'s tables are regenerated."""
    from ..ops import static
    from .common import timestamp

    args = build_parser().parse_args(argv)
    if args.vllm_python and args.peer:
        raise SystemExit("give --vllm-python or --peer, not both")
    jobs = static.all_jobs()
    if args.load:
        args.targets = [_device_target()]
    if args.targets:
        jobs = [j for j in jobs if j[1] in args.targets]
        if not jobs:
            raise SystemExit(
                f"--targets {args.targets}: no registered spec launches there (targets: {static.aot.TARGETS})"
            )
    if args.only:
        jobs = [j for j in jobs if any(j[0].startswith(p) for p in args.only)]
        if not jobs:
            raise SystemExit(f"--only {args.only} matches no registered spec")
    started = time.perf_counter()
    print(f"[static] compiling {len(jobs)} (configuration, target) pairs", file=sys.stderr, flush=True)
    kernels = annotate(static.inspect_all(jobs, workers=args.workers, load=args.load))
    peer = None
    if args.peer:
        with open(args.peer) as f:
            peer = json.load(f)
    elif args.vllm_python:
        print(f"[static] compiling vLLM's paged kernel in {args.vllm_python}", file=sys.stderr, flush=True)
        peer = run_peer(args.vllm_python)
    created = timestamp()
    doc: dict = {
        "format": FORMAT,
        "created_utc": created,
        "complete": not (args.only or args.targets),
        "env": _environment(),
        "seconds": round(time.perf_counter() - started, 1),
        "summary": summarize(kernels),
        "kernels": kernels,
        "peer": peer,
    }
    if args.load:
        committed = latest_report(os.path.join("bench", "results")) if source_checkout else None
        doc["loaded_vs_static"] = compare_loaded(kernels, committed)
        doc["loaded_vs_static"]["committed_file"] = committed and committed["_file"]
        print(f"[static] loaded vs static: {json.dumps(doc['loaded_vs_static'])[:2000]}", file=sys.stderr)
    out_dir = args.out or default_out
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"static-triton{doc['env']['triton']}-{created}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    failing = sum(bool(r["violations"]) for r in kernels.values())
    print(f"[static] wrote {path}: {failing} of {len(kernels)} compiles fail the gate", file=sys.stderr)
    if doc["complete"] and not args.no_readme and source_checkout and args.out is None:
        render_readme(out_dir, os.path.join("bench", "README.md"))
        print("[static] regenerated bench/README.md", file=sys.stderr)
    return path


# ----------------------------------------------------------------------------- tables


def latest_report(results_dir: str) -> dict | None:
    """The newest complete static report directly under ``results_dir``."""
    best = None
    for path in sorted(glob.glob(os.path.join(results_dir, "static-*.json"))):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        if doc.get("format") == FORMAT and doc.get("complete") and (best is None or doc["created_utc"] >= best[0]):
            best = (doc["created_utc"], doc, os.path.basename(path))
    if best is None:
        return None
    best[1]["_file"] = best[2]
    return best[1]


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _kernel_cells(r: dict) -> list:
    if "registers" not in r:
        return [r["name"], f"sm{r['cc']}", "error", "", "", "", "", "", "", "", ""]
    return [
        r["name"],
        f"sm{r['cc']}",
        r["registers"],
        f"{r['spill_stores']}/{r['spill_loads']}",
        r["local"],
        round(r["shared"] / 1024, 1),
        f"{r['ctas_per_sm']} ({r['limiter']})",
        f"{100 * r['occupancy']:.1f}%",
        f"{r['loop_mma']}/{r['mma']}",
        r["async_copy"],
        r["loop_instructions"],
    ]


KERNEL_HEADER = (
    "kernel",
    "target",
    "regs",
    "spill st/ld (B)",
    "LDL/STL",
    "smem KiB",
    "CTAs/SM (limit)",
    "occupancy",
    "MMA loop/all",
    "async copies",
    "KV-loop instrs",
)

_PAGED = re.compile(r"^paged_(fp16|bf16|fp32)_d(\d+)_bs(\d+)_m(\d+)$")


def _peer_rows(doc: dict) -> list[str]:
    """Our paged kernel's decode tile beside vLLM's decode launch at each (dtype, head dim, block
    size, GQA group, target) the peer was compiled for (one compiled kernel of ours serves every
    group): KV-loop instructions per key."""
    from ..ops.triton.paged import DECODE_ROWS

    peer = doc.get("peer") or {}
    ours: dict[tuple, dict] = {}
    for r in doc["kernels"].values():
        m = _PAGED.match(r["name"])
        if m and int(m.group(4)) == DECODE_ROWS and "registers" in r:
            ours[(m.group(1), int(m.group(2)), int(m.group(3)), r["cc"])] = r
    rows = []
    for key, p in sorted((peer.get("kernels") or {}).items()):
        cc = int(key.rsplit("@", 1)[1])
        mine = ours.get((p["dtype"], p["head_dim"], p["block_size"], cc))
        tile = p["tile_size"]
        ratio = ""
        if mine and mine["loop_instructions"] and p["loop_instructions"]:
            # ours takes one cache block (block_size keys) per iteration, vLLM TILE_SIZE keys
            ratio = f"{(mine['loop_instructions'] / p['block_size']) / (p['loop_instructions'] / tile):.2f}"
        rows.append(
            _row(
                [
                    f"{p['dtype']} d{p['head_dim']} block {p['block_size']} GQA {p['group']}",
                    f"sm{cc}",
                    f"{mine['registers']} / {p['registers']}" if mine else f"— / {p['registers']}",
                    f"{mine['spill_stores']} / {p['spill_stores']}" if mine else f"— / {p['spill_stores']}",
                    f"{mine['loop_instructions']} ({p['block_size']} keys)" if mine else "—",
                    f"{p['loop_instructions']} ({tile} keys)",
                    ratio,
                ]
            )
        )
    return rows


def render(doc: dict | None) -> str:
    """The markdown between the static markers of bench/README.md."""
    from ..ops import static

    if doc is None:
        return NO_REPORT
    env = doc["env"]
    tools = ", ".join(f"{k}: {v}" for k, v in env["tools"].items())
    commit = (env.get("git_commit") or "unknown")[:10] + (" (dirty)" if env.get("git_dirty") else "")
    kernels = doc["kernels"]
    failing = [r for r in kernels.values() if r["violations"]]
    lines = [
        f"Generated from `bench/results/{doc['_file']}` (commit {commit}, Triton {env['triton']}; {tools}). "
        f"{len(kernels)} compiles of every registered configuration on each target it launches on, "
        f"{len(failing)} failing the gate (`static.violations`); {doc['seconds']:.0f} s on {env['cpu_count']} CPU cores.",
        "",
        "Per kernel family: compiles failing the gate / compiles, most registers, least warps per SM.",
        "",
    ]
    targets = sorted({f"sm{r['cc']}" for r in kernels.values()}, key=lambda t: int(t[2:]))
    lines += [_row(["family", *targets]), _row(["---"] * (len(targets) + 1))]
    for fam, per in doc["summary"].items():
        cells = []
        for t in targets:
            s = per.get(t)
            cells.append(
                "—"
                if s is None
                else f"{s['failing']}/{s['compiles']}, {s['max_registers']} regs, {s['min_warps_per_sm']} warps"
            )
        lines.append(_row([f"`{fam}`", *cells]))
    if failing:
        lines += ["", "Failing the gate:", ""]
        lines += [f"- `{r['name']}` on sm{r['cc']}: {'; '.join(r['violations'])}" for r in failing]
    peer_rows = _peer_rows(doc)
    if peer_rows:
        p = doc["peer"]
        lines += [
            "",
            f"Paged attention, ours / vLLM {p.get('vllm')} `{p.get('peer', 'triton_unified_attention')}` "
            "(vLLM's launcher's own tile choice); the ratio is our KV-loop instructions per key over vLLM's:",
            "",
            _row(
                [
                    "shape",
                    "target",
                    "regs ours / vLLM",
                    "spill bytes ours / vLLM",
                    "our KV loop",
                    "vLLM KV loop",
                    "ratio",
                ]
            ),
            _row(["---"] * 7),
            *peer_rows,
        ]
    main = [
        r
        for r in kernels.values()
        if r["family"] in static.MMA_FAMILIES
        and r["dtype"] in ("fp16", "bf16")
        and re.search(r"_b?d128(_|$)", r["name"])
    ]
    lines += [
        "",
        "fp16/bf16 kernels at head dim 128 (spill bytes per thread; MMA: tensor-core instructions "
        "in the main KV loop / in the kernel; async copies: LDGSTS or TMA):",
        "",
        _row(KERNEL_HEADER),
        _row(["---"] * len(KERNEL_HEADER)),
    ]
    lines += [_row(_kernel_cells(r)) for r in sorted(main, key=lambda r: (r["name"], r["cc"]))]
    lines += [
        "",
        "<details><summary>Every compile</summary>",
        "",
        _row(KERNEL_HEADER),
        _row(["---"] * len(KERNEL_HEADER)),
    ]
    lines += [_row(_kernel_cells(r)) for r in sorted(kernels.values(), key=lambda r: (r["name"], r["cc"]))]
    lines += ["", "</details>"]
    return "\n".join(lines)


def render_readme(results_dir: str, readme: str) -> None:
    """Replace the text between the static markers of ``readme`` with ``render``'s."""
    with open(readme) as f:
        text = f.read()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w") as f:
        f.write(f"{head}{START}\n{render(latest_report(results_dir))}\n{END}{tail}")
