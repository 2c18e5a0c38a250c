"""Regenerate the README performance section and the plots from benchmark JSON files only.

    python bench/make_table.py [--results bench/results] [--readme README.md] [--plots-dir DIR]
    python -m vskip_kernels.bench.table [--results DIR] (--readme FILE | --print) [--plots-dir DIR]

(the first, in a source checkout, is a wrapper of the second with the repository's folders
as defaults; elsewhere the results default to the runner's, see ``run.default_out``.)

Only GPU results count: smoke runs (in ``<results>/smoke``, or flagged ``smoke``), CPU
runs and files with no case yet are ignored. For each suite and GPU the newest result of
each case is used, so a run split into parts combines (see ``latest``); a run stopped by a
time limit (``complete`` false) is shown with what it measured, and says so. The README
text between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` is replaced; nothing
else in the file changes. Plots need matplotlib and are skipped (with a message)
without it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
NO_RESULTS = (
    "_No GPU results yet._ Run `vskip bench` on a CUDA GPU, then `python bench/make_table.py` (see bench/README.md)."
)
SUITE_ORDER = ("attention", "visual_mass", "decode", "model")
OURS = ("ours-triton", "ours-torch")


# ----------------------------------------------------------------------------- loading


def is_gpu_result(doc: dict) -> bool:
    env = doc.get("env") or {}
    return (
        doc.get("format") == "vskip-bench/1"
        and not doc.get("smoke", False)
        and env.get("device") == "cuda"
        and bool(env.get("gpu"))
        and bool(doc.get("cases"))
    )


def load_results(results_dir: str) -> list[dict]:
    """GPU result documents directly under ``results_dir`` (subdirectories such as smoke/ are not read)."""
    docs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"make_table: skipping unreadable {path}: {exc}", file=sys.stderr)
            continue
        if isinstance(doc, dict) and is_gpu_result(doc):
            doc["_path"] = path
            docs.append(doc)
    return docs


VERSION_KEYS = ("torch", "triton", "transformers", "cuda", "flash_attn")


def latest(docs: list[dict]) -> list[dict]:
    """Per (suite, GPU): the newest result of each case, ordered by suite then GPU.

    Runs split by a time limit (``bench/gpu_check.py --only ...``, ``--shapes``, ``--models``)
    leave one file per part. The newest file is the base; each case it lacks comes from the
    newest older file that has it, measured with the same torch/triton/transformers/CUDA.
    Each case keeps its own numbers and ratios (all from one run) and the target checks of
    the run it came from; the header names every file used."""
    groups: dict = {}
    for d in docs:
        groups.setdefault((d["suite"], d["env"]["gpu"]), []).append(d)
    order = {s: i for i, s in enumerate(SUITE_ORDER)}
    out = []
    for key in sorted(groups, key=lambda k: (order.get(k[0], 99), k[0], k[1])):
        ds = sorted(groups[key], key=lambda d: d.get("created_utc", ""), reverse=True)  # newest first
        out.append(_merge([d for d in ds if _same_versions(d, ds[0])]))
    return out


def _same_versions(a: dict, b: dict) -> bool:
    return all(a["env"].get(k) == b["env"].get(k) for k in VERSION_KEYS)


def _owner(x: dict):
    """The shape or model a case or a check belongs to."""
    return x.get("shape") or x.get("model")


def _merge(ds: list[dict]) -> dict:
    """One document from ``ds`` (newest first): see ``latest``."""
    if len(ds) == 1:
        return ds[0]
    chosen: dict = {}  # case id -> (doc, case), newest doc first
    for d in ds:
        for c in d["cases"]:
            chosen.setdefault(c["case"], (d, c))
    used = [d for d in ds if any(src is d for src, _ in chosen.values())]
    cases = [c for d in reversed(used) for c in d["cases"] if chosen[c["case"]][0] is d]
    owners = {id(d): {_owner(c) for c in d["cases"] if chosen[c["case"]][0] is d} for d in used}
    checks = [ch for d in reversed(used) for ch in d.get("checks", []) if _owner(ch) in owners[id(d)]]
    shapes, seen = [], set()
    for d in used:
        for sh in d.get("shapes", []):
            if sh.get("name") not in seen:
                seen.add(sh.get("name"))
                shapes.append(sh)
    merged = dict(ds[0], cases=cases, checks=checks, shapes=shapes, complete=all(d.get("complete", True) for d in used))
    merged["_paths"] = [d.get("_path", "") for d in used]
    merged["_commits"] = sorted({(d["env"].get("git_commit") or "unknown")[:10] for d in used})
    return merged


# ----------------------------------------------------------------------------- formatting


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x == 0:
            return "0"
        ax = abs(x)
        if ax >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{max(digits - 1 - int(f'{ax:e}'.split('e')[1]), 0)}f}"
    return str(x)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _find(results, backend):
    return next((r for r in results if r["backend"] == backend), None)


def _primary(case):
    for b in OURS:
        r = _find(case["results"], b)
        if r is not None:
            return r
    return None


def _col(backend: str) -> str:
    """Table column of a backend: SDPA with and without an explicit mask share one."""
    return backend.replace(" (bool mask)", "")


def _vs_cell(case, col, mine):
    """'<ms> (<speedup of ours>x)' for a baseline, or why it is missing."""
    r = next((x for x in case["results"] if _col(x["backend"]) == col), None)
    if r is None:
        skipped = next((s for s in case.get("skipped", []) if _col(s["backend"]) == col), None)
        return "skipped" if skipped else "—"
    if mine is None or r is mine:
        return fmt(r["ms_median"])
    return f"{fmt(r['ms_median'])} ({fmt(r['ms_median'] / mine['ms_median'])}×)"


def header_line(doc: dict) -> str:
    env = doc["env"]
    commit = (env.get("git_commit") or "unknown")[:10] + (" (dirty)" if env.get("git_dirty") else "")
    if doc.get("_paths"):  # merged from several runs (see latest)
        files = ", ".join(f"`{os.path.basename(p)}`" for p in doc["_paths"])
        return (
            f"{env['gpu']} ({env.get('gpu_capability') or '?'}), driver {env.get('driver_version') or '?'}, "
            f"CUDA {env.get('cuda') or '?'}, torch {env.get('torch')}, triton {env.get('triton')}, "
            f"transformers {env.get('transformers')}, commit {', '.join(doc['_commits'])}; newest result "
            f"of each case from {files}"
            + ("; partial: a run stopped before every case was measured" if doc.get("complete") is False else "")
        )
    return (
        f"{env['gpu']} ({env.get('gpu_capability') or '?'}), driver {env.get('driver_version') or '?'}, "
        f"CUDA {env.get('cuda') or '?'}, torch {env.get('torch')}, triton {env.get('triton')}, "
        f"transformers {env.get('transformers')}, commit {commit}, run {doc.get('created_utc', '?')} "
        f"(`{os.path.basename(doc.get('_path', ''))}`)"
        + ("; partial: the run stopped before every case was measured" if doc.get("complete") is False else "")
    )


def _baselines(cases):
    seen = []
    for c in cases:
        for r in list(c["results"]) + list(c.get("skipped", [])):
            if r["backend"] not in OURS and _col(r["backend"]) not in seen:
                seen.append(_col(r["backend"]))
    return seen


def render_attention(doc):
    cases = doc["cases"]
    others = _baselines(cases)
    rows = []
    for c in cases:
        mine = _primary(c)
        torch_b = _find(c["results"], "ours-torch") if mine and mine["backend"] != "ours-torch" else None
        rows.append(
            [
                c["shape"],
                c["policy"],
                fmt(c.get("live_tile_fraction")),
                f"{fmt(mine['ms_median'])} [{mine['backend']}]" if mine else "—",
                fmt(mine.get("tflops")) if mine else "—",
            ]
            + [_vs_cell(c, b, mine) for b in others]
            + [f"{fmt(torch_b['ms_median'])} ({fmt(torch_b['ms_median'] / mine['ms_median'])}×)" if torch_b else "—"]
        )
    head = ["shape", "policy", "live/causal tiles", "ours ms", "ours TFLOP/s"]
    head += [("sdpa (causal / bool mask)" if b == "sdpa" else b) + " ms (our speedup)" for b in others]
    head.append("ours-torch ms (our speedup)")
    return table(head, rows)


def render_visual_mass(doc):
    rows = []
    for c in doc["cases"]:
        for r in c["results"]:
            rows.append(
                [
                    str(c.get("seq_len")),
                    c["task"],
                    r["backend"],
                    fmt(r["ms_median"]),
                    fmt(r.get("peak_mem_bytes") / 2**20 if r.get("peak_mem_bytes") else None),
                ]
            )
        for s in c.get("skipped", []):
            rows.append([str(c.get("seq_len")), c["task"], s["backend"], f"skipped: {s['reason'][:60]}", "—"])
    return table(["N", "task", "backend", "ms", "peak MiB"], rows)


def render_decode(doc):
    cases = doc["cases"]
    others = _baselines(cases)
    rows = []
    for c in cases:
        mine = _primary(c)
        rows.append(
            [
                c["heads"],
                str(c["cache_len"]),
                f"{fmt(mine['ms_median'])} [{mine['backend']}]" if mine else "—",
                fmt(mine.get("gbps")) if mine else "—",
            ]
            + [_vs_cell(c, b, mine) for b in others]
        )
    return table(["heads", "cache", "ours ms", "ours GB/s"] + [f"{b} ms (our speedup)" for b in others], rows)


def _mib(n) -> str:
    return "—" if n is None else f"{n / 2**20:.1f}"


def render_model(doc):
    rows = []
    for c in doc["cases"]:
        for r in c["results"]:
            vd = r.get("vs_dense") or {}
            rows.append(
                [
                    c["model"],
                    r["backend"],
                    fmt(r.get("decoder_flops_pct_of_dense")),
                    _mib(r.get("kv_cache_bytes")),
                    fmt(r.get("prefill_ms")),
                    fmt(r.get("decode_ms_per_token")),
                    fmt(r.get("avg_output_len")),
                    fmt(r.get("throughput_tok_s")),
                    fmt(vd.get("ttft_speedup")),
                    fmt(vd.get("decode_token_reduction_pct")),
                    fmt(vd.get("throughput_gain_pct")),
                ]
            )
        for s in c.get("skipped", []):
            rows.append([c["model"], s["backend"], f"skipped: {s['reason'][:60]}"] + ["—"] * 8)
    return table(
        [
            "model",
            "method",
            "FLOPs % of dense (counted)",
            "KV MiB (counted)",
            "prefill/TTFT ms",
            "decode ms/token",
            "avg len",
            "tokens/s",
            "TTFT speedup",
            "decode/token −%",
            "throughput +%",
        ],
        rows,
    )


def render_checks(docs):
    rows = []
    for d in docs:
        for ch in d.get("checks", []):
            where = ch.get("shape") or ch.get("model") or ""
            if ch.get("target_applies") is False:
                where += " (reference only)"
            mark = "—" if ch.get("passed") is None else ("pass" if ch["passed"] else "FAIL")
            rows.append([d["env"]["gpu"], ch["name"], where, fmt(ch.get("value")), ch["target"], mark])
    return table(["GPU", "target", "case", "measured", "target", "result"], rows) if rows else ""


RENDERERS = {
    "attention": ("Prefill attention", render_attention),
    "visual_mass": ("Visual attention mass", render_visual_mass),
    "decode": ("Decode attention (one query vs KV cache)", render_decode),
    "model": ("Model level (FlashVLM metrics)", render_model),
}


def render(docs: list[dict]) -> str:
    docs = latest(docs)
    if not docs:
        return NO_RESULTS
    parts = ["_Generated by `bench/make_table.py` from the JSON files in bench/results; do not edit by hand._"]
    for d in docs:
        title, fn = RENDERERS.get(d["suite"], (d["suite"], None))
        if fn is None:
            continue
        parts.append(f"#### {title} — {d['env']['gpu']}\n\n{header_line(d)}\n\n{fn(d)}")
    checks = render_checks(docs)
    if checks:
        parts.append("#### Targets\n\n" + checks)
    return "\n\n".join(parts)


def replace_section(text: str, body: str, where: str = "README") -> str:
    if text.count(START) != 1 or text.count(END) != 1:
        raise ValueError(f"{where} must contain exactly one {START} and one {END} marker")
    i, j = text.index(START), text.index(END)
    if j < i:
        raise ValueError(f"{where}: {END} comes before {START}")
    return text[: i + len(START)] + "\n" + body.strip() + "\n" + text[j:]


def update_readme(readme: str, body: str) -> bool:
    """Replace the marked section; returns True when the file changed."""
    with open(readme) as f:
        old = f.read()
    new = replace_section(old, body, readme)
    if new != old:
        with open(readme, "w") as f:
            f.write(new)
    return new != old


# ----------------------------------------------------------------------------- plots


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def make_plots(docs: list[dict], plots_dir: str) -> list[str]:
    """PNG plots from the result documents; [] when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("make_table: matplotlib is not installed; no plots written", file=sys.stderr)
        return []
    from matplotlib.ticker import FuncFormatter, NullFormatter

    os.makedirs(plots_dir, exist_ok=True)
    written = []

    def log_axes(ax):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
            axis.set_minor_formatter(NullFormatter())

    def save(fig, name):
        path = os.path.join(plots_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    def plot_times(series, xlabel, title, legend_size, name):
        """One line per backend of (length, median ms) points, log-log."""
        fig, ax = plt.subplots(figsize=(6, 4))
        for b, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=b)
        log_axes(ax)
        ax.set(xlabel=xlabel, ylabel="ms (median)", title=title)
        ax.legend(fontsize=legend_size)
        save(fig, name)

    for d in latest(docs):
        gpu = d["env"]["gpu"]
        if d["suite"] == "attention":
            seq = {s["name"]: s["seq_len"] for s in d["shapes"]}
            for policy in ("dense", "vskip", "frozen"):
                series: dict = {}
                for c in d["cases"]:
                    if c["policy"] != policy:
                        continue
                    for r in c["results"]:
                        series.setdefault(r["backend"], []).append((seq[c["shape"]], r["ms_median"]))
                if series:
                    plot_times(
                        series,
                        "sequence length",
                        f"{policy} attention — {gpu}",
                        7,
                        f"attention-{policy}-{_slug(gpu)}.png",
                    )
        elif d["suite"] == "decode":
            series = {}
            for c in d["cases"]:
                for r in c["results"]:
                    series.setdefault(f"{r['backend']} ({c['heads']})", []).append((c["cache_len"], r["ms_median"]))
            if series:
                plot_times(series, "cache length", f"decode attention — {gpu}", 6, f"decode-{_slug(gpu)}.png")
        elif d["suite"] == "model":
            fig, ax = plt.subplots(figsize=(6, 4))
            plotted = False
            for c in d["cases"]:
                for kind, key, metric in (("vskip", "n", "ttft_speedup"), ("shortv", "n", "ttft_speedup")):
                    pts = [(0, 1.0)] + [
                        (r["method"][key], r["vs_dense"][metric])
                        for r in c["results"]
                        if r.get("method", {}).get("kind") == kind and r.get("vs_dense")
                    ]
                    if len(pts) > 1:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{c['model']} {kind}")
                        plotted = True
                pts = [(0, 1.0)] + [
                    (r["method"]["bypass"], 1.0 / (1 - r["vs_dense"]["decode_token_reduction_pct"] / 100))
                    for r in c["results"]
                    if r.get("method", {}).get("kind") == "flashvlm"
                    and r.get("vs_dense")
                    and r["vs_dense"].get("decode_token_reduction_pct") is not None
                    and r["vs_dense"]["decode_token_reduction_pct"] < 100
                ]
                if len(pts) > 1:
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        marker="s",
                        linestyle="--",
                        label=f"{c['model']} flashvlm (decode)",
                    )
                    plotted = True
            if plotted:
                ax.set(
                    xlabel="skipped layers",
                    ylabel="speedup vs dense (TTFT; decode for flashvlm)",
                    title=f"speedup vs skipped layers — {gpu}",
                )
                ax.legend(fontsize=6)
                save(fig, f"model-speedup-{_slug(gpu)}.png")
            else:
                plt.close(fig)
    return written


# ----------------------------------------------------------------------------- entry point


def main(argv=None, *, results: str | None = None, readme: str | None = None) -> int:
    """``results`` / ``readme``: defaults of ``--results`` / ``--readme`` (bench/make_table.py
    passes the repository's); without them the runner's default results folder, and
    README.md when the current directory is a source checkout."""
    from .run import default_out, is_source_checkout

    results = results or default_out()
    readme = readme or ("README.md" if is_source_checkout() else None)
    p = argparse.ArgumentParser(prog="make_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=results, help="results directory (default: %(default)s)")
    p.add_argument("--readme", default=readme, help="README to update (default: %(default)s)")
    p.add_argument("--plots-dir", default=None, help="default: <results>/plots")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--print", action="store_true", help="print the section instead of writing the README")
    args = p.parse_args(argv)
    if args.readme is None and not args.print:
        p.error("no README here to update: pass --readme FILE, or --print")
    docs = load_results(args.results)
    body = render(docs)
    if args.print:
        print(body)
    else:
        changed = update_readme(args.readme, body)
        print(
            f"make_table: {args.readme} {'updated' if changed else 'unchanged'} "
            f"({len(latest(docs))} GPU result file(s))",
            file=sys.stderr,
        )
    if not args.no_plots and docs:
        for path in make_plots(docs, args.plots_dir or os.path.join(args.results, "plots")):
            print(f"make_table: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
