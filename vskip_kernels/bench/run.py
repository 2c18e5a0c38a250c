"""Benchmark runner: ``vskip bench [suite ...] [options]`` (also ``python -m vskip_kernels.bench``
and, in a source checkout, ``python bench/run.py``). Each suite writes one JSON file; smoke
runs go to ``<out>/smoke`` so they never reach the README table.

The results folder is ``--out DIR`` when given, else ``default_out()``: ``bench/results`` when
the current directory is the root of a source checkout (where the README table is made
from), ``vskip_bench_results`` in the current directory anywhere else (an installed package).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

SUITES = ("attention", "visual_mass", "decode", "model")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
CHECKOUT_OUT = os.path.join("bench", "results")  # in a source checkout: where make_table reads
INSTALLED_OUT = "vskip_bench_results"  # anywhere else


def is_source_checkout(path: str = ".") -> bool:
    """Whether ``path`` is the root of a vskip_kernels source checkout (its ``bench/`` folder
    next to the package source)."""
    return os.path.isfile(os.path.join(path, "bench", "make_table.py")) and os.path.isfile(
        os.path.join(path, "vskip_kernels", "__init__.py")
    )


def default_out() -> str:
    """The results folder without ``--out``, relative to the current directory."""
    return CHECKOUT_OUT if is_source_checkout() else INSTALLED_OUT


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vskip bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help=f"sub-suites to run: {', '.join(SUITES)} or all (default: all); "
        "'vskip bench static --help': the static kernel report (no GPU)",
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes and few iterations (CPU OK); results go to <out>/smoke"
    )
    p.add_argument(
        "--out",
        default=None,
        help=f"results directory (default: {CHECKOUT_OUT} at the root of a source checkout, else ./{INSTALLED_OUT})",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=None, help="warmup calls per measurement")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement")
    p.add_argument("--flush-l2", action="store_true", help="flush the GPU L2 cache before each timed call")
    p.add_argument(
        "--shapes", nargs="+", default=None, metavar="NAME", help="attention/visual_mass: only these shape names"
    )
    p.add_argument("--models", nargs="+", default=None, metavar="NAME", help="model suite: only these models")
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="KEY",
        help="model suite: only these methods, in this order (the dense SDPA baseline always runs "
        "first): dense-sdpa dense-ours vskip shortv flashvlm vskip+flashvlm shortv+flashvlm "
        "shortv+vskip fastv fastv+shortv fastv+vskip",
    )
    p.add_argument("--max-new-tokens", type=int, default=None, help="model suite: generated tokens per sample")
    p.add_argument("--model-repeats", type=int, default=None, help="model suite: generate() runs per method")
    p.add_argument(
        "--decode-mode",
        choices=("graphs", "eager"),
        default="graphs",
        help="model suite: decode with a static cache + torch.compile(reduce-overhead) "
        "(CUDA graphs) or eagerly; graphs fall back to eager, recorded, when they fail",
    )
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    bad = [s for s in args.suites if s not in SUITES + ("all",)]
    if bad:
        parser.error(f"unknown suite(s) {bad}; choose from {', '.join(SUITES)} or all")
    suites = list(SUITES) if not args.suites or "all" in args.suites else list(dict.fromkeys(args.suites))
    args.suites = suites
    if args.out is None:
        args.out = default_out()
    if args.warmup is None:
        args.warmup = 1 if args.smoke else 5
    if args.repeats is None:
        args.repeats = 2 if args.smoke else 20
    if args.max_new_tokens is None:
        args.max_new_tokens = 4 if args.smoke else 64
    if args.model_repeats is None:
        args.model_repeats = 1 if args.smoke else 3
    for name in ("warmup", "max_new_tokens"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("repeats", "model_repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_new_tokens < 2 and "model" in suites:
        raise SystemExit("--max-new-tokens must be >= 2 (decode time is measured after the first token)")
    if args.methods:
        from .model import METHOD_KEYS

        unknown = [m for m in args.methods if m not in METHOD_KEYS]
        if unknown:
            parser.error(f"unknown --methods {unknown}; choose from {', '.join(METHOD_KEYS)}")
    if args.shapes:
        known = shape_names(args.smoke, suites)
        unknown = [s for s in args.shapes if s not in known]
        if unknown:
            parser.error(
                f"unknown --shapes {unknown} for {'smoke ' if args.smoke else ''}suites "
                f"{', '.join(suites)}; choose from {', '.join(known) or '(none: these suites take no shapes)'}"
            )
    return args


def shape_names(smoke: bool, suites) -> list[str]:
    """Names --shapes accepts for these suites (attention and visual_mass have named shapes)."""
    from . import cases

    table = {
        "attention": cases.SMOKE_ATTENTION_SHAPES if smoke else cases.ATTENTION_SHAPES,
        "visual_mass": cases.SMOKE_MASS_SHAPES if smoke else cases.MASS_SHAPES,
    }
    return [s.name for suite in suites for s in table.get(suite, ())]


def main(argv=None) -> list[str]:
    """Run the chosen suites; returns the paths of the JSON files written.

    ``static`` first (``vskip bench static [options]``) is the static kernel report instead: it
    compiles every kernel configuration for each GPU target and needs no GPU
    (``static_report``, its own options)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["static"]:
        from .static_report import main as static_main

        return [static_main(argv[1:], default_out=default_out(), source_checkout=is_source_checkout())]
    import torch

    from .common import environment, result_path, timestamp, write_results

    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA GPU is available")
    dtype = getattr(torch, DTYPES[args.dtype])
    out_dir = os.path.join(args.out, "smoke") if args.smoke else args.out
    if device.type != "cuda" and not args.smoke:
        print("note: no GPU; results are written but make_table ignores CPU results", file=sys.stderr)
    env = environment(device)
    settings = {
        k: getattr(args, k)
        for k in (
            "smoke",
            "dtype",
            "warmup",
            "repeats",
            "flush_l2",
            "max_new_tokens",
            "model_repeats",
            "decode_mode",
            "methods",
        )
    }
    paths = []
    for suite in args.suites:
        mod = importlib.import_module(f".{suite}", __package__)
        created = timestamp()
        os.makedirs(out_dir, exist_ok=True)
        path = result_path(out_dir, suite, env, created)
        common = dict(smoke=args.smoke, settings=settings, path=path, created_utc=created)

        def save_partial(shapes, cases, checks, suite=suite, common=common):
            write_results(
                out_dir,
                suite,
                env,
                shapes,
                cases,
                checks=checks,
                complete=False,
                notes=["partial: the run was still going when this was saved"],
                **common,
            )

        args.checkpoint = save_partial
        print(f"[bench] {suite} on {env['gpu'] or device.type} -> {path}", file=sys.stderr, flush=True)
        shapes, cases, checks, notes = mod.run(args, device, dtype)
        write_results(out_dir, suite, env, shapes, cases, checks=checks, notes=notes, **common)
        print(f"[bench] wrote {path}", file=sys.stderr, flush=True)
        paths.append(path)
    return paths


if __name__ == "__main__":
    main()
