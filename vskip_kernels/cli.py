"""The ``vskip`` command line: calibrate a plan, generate with it, benchmark, demo.

Expected failures (bad paths, unreadable images, malformed data, a plan for another
model) print one ``vskip: error: ...`` line on stderr and exit with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_ERROR = 2


class CLIError(Exception):
    """An error the user can fix; printed as one line."""


def _parse_option(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass  # a bare word such as kl_direction=reverse stays a string
    return key.strip(), value


def _parse_budgets(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budgets takes comma-separated ints such as 2,4,6, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("--budgets needs at least one number of layers")
    return values


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (or hub name) for from_pretrained")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="weights dtype (auto: bfloat16 on GPU, float32 on CPU)",
    )


def build_parser() -> argparse.ArgumentParser:
    from .calibrate import METHODS

    parser = argparse.ArgumentParser(prog="vskip", description="Layer skipping for vision-language models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    c = sub.add_parser("calibrate", help="score decoder layers on data and write a skip plan")
    _add_model_args(c)
    c.add_argument(
        "--data",
        help='JSON lines: {"image": path | "images": [paths], "prompt": text} per line (not needed for depth/random)',
    )
    c.add_argument("--method", required=True, choices=METHODS)
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget", type=int, help="number of layers to choose")
    g.add_argument("--skip-ratio", type=float, help="fraction r of the layers: k = floor(r * L)")
    c.add_argument("-o", "--output", required=True, help="where to write the plan (JSON)")
    c.add_argument("--max-new-tokens", type=int, default=32, help="visual_mass: greedy tokens per sample")
    c.add_argument("--batch-size", type=int, default=1)
    c.add_argument("--max-samples", type=int, default=None, help="use at most this many data rows")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--option",
        action="append",
        type=_parse_option,
        default=[],
        metavar="KEY=VALUE",
        help="method option, e.g. num_samples=40, kl_direction=reverse, target=frozen, tokens=visual",
    )
    c.add_argument(
        "--base-plan",
        help="plan JSON to calibrate on top of (e.g. prune stages): visual_mass/vig/lc score the model under it, "
        "and the output plan is it plus the chosen layers",
    )
    c.add_argument("--no-progress", action="store_true")

    d = sub.add_parser("diagnostics", help="print Skip-It's per-layer redundancy measures")
    _add_model_args(d)
    d.add_argument("--data", required=True)
    d.add_argument("--batch-size", type=int, default=1)
    d.add_argument("--max-samples", type=int, default=None)
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")
    d.add_argument("--no-progress", action="store_true")

    gen = sub.add_parser("generate", help="generate with a skip plan applied")
    _add_model_args(gen)
    gen.add_argument("--plan", help="plan JSON from `vskip calibrate` (omit for the dense model)")
    gen.add_argument("--image", action="append", default=[], help="image path (repeat for several)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")

    b = sub.add_parser(
        "bench", help="run the benchmark suites (vskip_kernels.bench); arguments are passed on", add_help=False
    )
    b.add_argument("args", nargs=argparse.REMAINDER)

    dm = sub.add_parser("demo", help="calibrate, apply and compare every method on the shipped tiny VLM")
    dm.add_argument("--quick", action="store_true", help="fewer samples and one N (under a minute on a 2-core CPU)")
    dm.add_argument("--calibration-samples", type=int, default=None, help="default 32 (16 with --quick)")
    dm.add_argument("--eval-samples", type=int, default=None, help="default 200 (48 with --quick)")
    dm.add_argument(
        "--budgets",
        type=_parse_budgets,
        default=None,
        metavar="N[,N...]",
        help="numbers of layers to skip (default every even N below the layer count: 2,4,6,8,10 "
        "for the shipped model; with --quick a third of the layers)",
    )
    dm.add_argument(
        "--model",
        default=None,
        help="a tiny VLM folder written by `python -m vskip_kernels.tinyvlm.train` (default: the shipped one)",
    )
    dm.add_argument(
        "--plot",
        default=None,
        metavar="OUT.png",
        help="draw accuracy vs layers skipped and the per-layer scores (needs matplotlib)",
    )
    dm.add_argument("--device", default=None)
    dm.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: OMP_NUM_THREADS if set, else one fewer than the usable cores)",
    )
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (they are off anyway when stderr is not a terminal)",
    )
    return parser


# -- model loading -------------------------------------------------------------------------


def _device_dtype(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CLIError(f"--device {device!r} is not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for but no CUDA GPU is available")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    return dev, dtype


def load_model(args):
    """(model, processor) from ``args.model``; one-line CLIError when either cannot be loaded."""
    import transformers as tf

    # Library chatter (weight-loading bars, backend notices) would bury the one-line
    # errors and the command's own output; real errors still raise.
    tf.utils.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    path = args.model
    if os.path.sep in path or path.startswith(".") or os.path.exists(path):
        if not os.path.isdir(path):
            raise CLIError(f"model folder not found: {path}")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CLIError(f"{path} is not a model folder (no config.json)")
    dev, dtype = _device_dtype(args)
    model, last = None, None
    for cls in (tf.AutoModelForImageTextToText, tf.AutoModelForCausalLM):
        try:
            model = cls.from_pretrained(path, dtype=dtype)
            break
        except (ValueError, KeyError) as exc:  # architecture not covered by this auto class
            last = exc
        except OSError as exc:
            raise CLIError(f"cannot load model {path!r}: {exc}") from None
    if model is None:
        raise CLIError(f"cannot load model {path!r}: {last}")
    try:
        processor = tf.AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CLIError(f"cannot load the processor of {path!r}: {exc}") from None
    return model.to(dev).eval(), processor


def _rows(args):
    """Data rows, checked (JSON, keys, images readable) before any model is loaded."""
    from .calibrate.data import check_images, read_rows

    if args.max_samples is not None and args.max_samples < 1:
        raise CLIError(f"--max-samples must be >= 1, got {args.max_samples}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    rows = read_rows(args.data, require_image=False)
    rows = rows[: args.max_samples] if args.max_samples else rows
    check_images(rows)
    return rows


def _check_rows_fit(rows, model) -> None:
    from .calibrate.data import DataError
    from .hf import visual_token_ids

    if visual_token_ids(model):
        for r in rows:
            if not r.images:
                raise DataError(f"{r.where}: the row has no image ('image' or 'images')")


# -- commands ------------------------------------------------------------------------------


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate
    from .calibrate.data import batches
    from .plan import SkipPlan

    if args.data is None and args.method not in ("depth", "random"):
        raise CLIError(f"--data is required for --method {args.method}")
    if args.data is not None and not os.path.isfile(args.data):
        raise CLIError(f"data file not found: {args.data}")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise CLIError(f"output folder does not exist: {out_dir}")
    base_plan = SkipPlan.load(args.base_plan) if args.base_plan else None
    rows = _rows(args) if args.data is not None else None
    model, processor = load_model(args)
    data = None
    if rows is not None:
        _check_rows_fit(rows, model)
        data = batches(processor, rows, args.batch_size)
    plan = calibrate(
        model,
        data,
        args.method,
        budget=args.budget,
        skip_ratio=args.skip_ratio,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress,
        base_plan=base_plan,
        **dict(args.option),
    )
    if plan.model.get("name_or_path") in ("", None):
        plan.model["name_or_path"] = args.model
    plan.save(args.output)
    chosen = {
        k: v
        for k, v in (
            ("vskip", plan.vskip_layers),
            ("frozen", plan.frozen_layers),
            ("decode_bypass", plan.decode_bypass_layers),
        )
        if v
    }
    on = " (with the base plan's)" if base_plan is not None else ""
    print(f"{args.method}: {plan.budget} of {plan.num_layers} layers {chosen or '(none)'}{on} -> {args.output}")
    return 0


def cmd_diagnostics(args) -> int:
    from .calibrate import diagnostics
    from .calibrate.data import batches

    if not os.path.isfile(args.data):
        raise CLIError(f"data file not found: {args.data}")
    rows = _rows(args)
    model, processor = load_model(args)
    _check_rows_fit(rows, model)
    res = diagnostics(model, batches(processor, rows, args.batch_size), progress_bar=not args.no_progress)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{'layer':>5}  {'visual attn ratio':>17}  {'visual cos dist':>15}  {'text cos dist':>13}")
    for i, (a, v, t) in enumerate(
        zip(res["visual_attention_ratio"], res["visual_cosine_distance"], res["text_cosine_distance"])
    ):
        print(f"{i:>5}  {a:>17.4f}  {v:>15.4f}  {t:>13.4f}")
    return 0


def cmd_generate(args) -> int:
    import torch

    from .calibrate._common import prepare
    from .calibrate.data import encode, load_image
    from .hf import apply_skip_plan, num_decoder_layers
    from .plan import SkipPlan

    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    plan = SkipPlan.load(args.plan) if args.plan else None
    images = [load_image(p) for p in args.image]
    model, processor = load_model(args)
    num = num_decoder_layers(model)
    if plan is None:
        plan = SkipPlan(num_layers=num)
    plan.check_model(num, args.model)
    inputs = prepare(encode(processor, [args.prompt], [images]), model)
    handle = apply_skip_plan(model, plan, backend=args.backend)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    finally:
        handle.remove()
    new = out[0, inputs["input_ids"].shape[1] :]
    tok = getattr(processor, "tokenizer", processor)
    print(tok.decode(new, skip_special_tokens=True))
    return 0


def _load_bench_main():
    """The benchmark runner's main (``vskip_kernels.bench.run``, shipped with the package)."""
    from .bench.run import main

    return main


def cmd_bench(args) -> int:
    main = _load_bench_main()
    rest = list(args.args)
    if rest and rest[0] == "--":
        rest = rest[1:]
    rc = main(rest)
    return rc if isinstance(rc, int) else 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    if args.plot is not None:
        from .demo_plot import check_plotting

        check_plotting(args.plot)  # before minutes of work, not after
    if args.model is not None and not os.path.isdir(args.model):
        raise CLIError(f"model folder not found: {args.model}")
    result = run_demo(
        quick=args.quick,
        calibration_samples=args.calibration_samples,
        eval_samples=args.eval_samples,
        budgets=args.budgets,
        device=args.device,
        seed=args.seed,
        progress=False if args.no_progress else None,
        model_path=args.model,
        threads=args.threads,
    )
    if args.plot is not None:
        from .demo_plot import plot

        plot(result, args.plot)
        print(f"plot -> {args.plot}")
    return 0


COMMANDS = {
    "calibrate": cmd_calibrate,
    "diagnostics": cmd_diagnostics,
    "generate": cmd_generate,
    "bench": cmd_bench,
    "demo": cmd_demo,
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `vskip bench --help` belongs to the bench runner, not to this parser.
    if "bench" in argv[:2] and argv.index("bench") == (1 if argv[:1] == ["--debug"] else 0):
        i = argv.index("bench")
        args = argparse.Namespace(command="bench", args=argv[i + 1 :], debug="--debug" in argv[:i])
    else:
        args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except Exception as exc:
        if args.debug:
            raise
        msg = str(exc).strip().splitlines()
        hint = "" if _expected(exc) else f" ({type(exc).__name__}; --debug shows the traceback)"
        print(f"vskip: error: {msg[0] if msg else type(exc).__name__}{hint}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("vskip: interrupted", file=sys.stderr)
        return 130


def _expected(exc: BaseException) -> bool:
    from .plan import PlanError

    return isinstance(exc, (CLIError, PlanError, ValueError, TypeError, OSError, ImportError))


if __name__ == "__main__":
    sys.exit(main())
