"""The ``vskip`` command line end to end on a tiny local model, and its error exits."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from python_tests import REPO_ROOT
from vskip_kernels import SkipPlan
from vskip_kernels.cli import main
from vskip_kernels.tinyvlm import build_model, build_processor

LAYERS = 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vskip_cli")
    model, processor = build_model(num_layers=LAYERS, seed=0), build_processor()  # untrained: fast
    model.save_pretrained(d / "model")
    processor.save_pretrained(d / "model")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (30 + 10 * i, 40, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    rows = [
        {"image": "img0.png", "prompt": "what is this?"},
        {"images": ["img1.png", str(d / "img2.png")], "prompt": "compare the two"},
        {"image": "img2.png", "prompt": "describe"},
    ]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "not_an_image.png").write_text("hello")
    return d


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line_error(rc, err, needle):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vskip: error:"), err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "method,extra,field",
    [
        ("vig", ["--budget", "2"], "vskip_layers"),
        ("visual_mass", ["--skip-ratio", "0.5", "--max-new-tokens", "3"], "decode_bypass_layers"),
        ("lc", ["--budget", "1", "--option", "kl_direction=reverse", "--batch-size", "2"], "frozen_layers"),
    ],
    ids=["vig", "visual_mass", "lc"],
)
def test_calibrate_then_generate(workdir, capsys, method, extra, field):
    out = workdir / f"{method}.json"
    rc, stdout, err = _run(
        capsys,
        "calibrate",
        "--model",
        workdir / "model",
        "--data",
        workdir / "data.jsonl",
        "--method",
        method,
        *extra,
        "-o",
        out,
        "--no-progress",
    )
    assert rc == 0, err
    plan = SkipPlan.load(out)
    assert plan.method == method and plan.num_layers == LAYERS
    assert len(getattr(plan, field)) == plan.budget > 0
    assert plan.calibration["num_samples"] == 3
    assert plan.model["num_layers"] == LAYERS
    assert method in stdout
    if method == "lc":
        assert plan.calibration["options"]["kl_direction"] == "reverse"
    rc, stdout, err = _run(
        capsys,
        "generate",
        "--model",
        workdir / "model",
        "--plan",
        out,
        "--image",
        workdir / "img0.png",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "4",
    )
    assert rc == 0, err
    assert stdout.endswith("\n")


def test_diagnostics_command(workdir, capsys):
    rc, stdout, err = _run(
        capsys,
        "diagnostics",
        "--model",
        workdir / "model",
        "--data",
        workdir / "data.jsonl",
        "--json",
        "--no-progress",
        "--max-samples",
        "1",
    )
    assert rc == 0, err
    res = json.loads(stdout)
    assert len(res["visual_attention_ratio"]) == LAYERS and res["num_samples"] == 1


def test_error_exits(workdir, capsys, tmp_path):
    model = workdir / "model"
    data = workdir / "data.jsonl"
    cal = (
        "calibrate",
        "--model",
        model,
        "--method",
        "cosine",
        "--budget",
        "1",
        "-o",
        tmp_path / "p.json",
        "--no-progress",
    )
    _one_line_error(*_run(capsys, *cal, "--data", tmp_path / "missing.jsonl")[::2], "data file not found")
    bad = tmp_path / "bad.jsonl"
    for text, needle in (
        ('{"prompt": "x"}\n', "no image"),
        ('{"image": "img0.png"}\n', "'prompt'"),
        ("{not json\n", "not valid JSON"),
        ('{"image": "nope.png", "prompt": "x"}\n', "image not found"),
        (json.dumps({"image": str(workdir / "not_an_image.png"), "prompt": "x"}) + "\n", "cannot read image"),
    ):
        bad.write_text(text)
        rc, _, err = _run(capsys, *cal, "--data", bad)
        _one_line_error(rc, err, needle)
        assert "bad.jsonl:1" in err
    rc, _, err = _run(
        capsys,
        "calibrate",
        "--model",
        tmp_path / "no_model",
        "--data",
        data,
        "--method",
        "cosine",
        "--budget",
        "1",
        "-o",
        tmp_path / "p.json",
    )
    _one_line_error(rc, err, "model folder not found")
    other = tmp_path / "other.json"
    SkipPlan(num_layers=LAYERS + 3, vskip_layers=[5], model={"name_or_path": "big-model"}).save(other)
    rc, _, err = _run(
        capsys, "generate", "--model", model, "--plan", other, "--prompt", "x", "--image", workdir / "img0.png"
    )
    _one_line_error(rc, err, "big-model")
    rc, _, err = _run(capsys, "generate", "--model", model, "--plan", tmp_path / "nope.json", "--prompt", "x")
    _one_line_error(rc, err, "cannot read plan")
    rc, _, err = _run(capsys, "generate", "--model", model, "--prompt", "x", "--image", workdir / "missing.png")
    _one_line_error(rc, err, "image not found")
    rc, _, err = _run(capsys, *cal, "--data", data, "--option", "colour=red")
    _one_line_error(rc, err, "unknown")
    assert not (tmp_path / "p.json").exists()


def test_bench_forwards_to_runner(monkeypatch, capsys):
    import vskip_kernels.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "_load_bench_main", lambda: lambda argv: seen.setdefault("argv", argv) and 0)
    assert main(["bench", "--smoke", "attention"]) == 0
    assert seen["argv"] == ["--smoke", "attention"]

    def absent():
        raise cli.CLIError("the benchmark suite (bench/run.py) is not available")

    monkeypatch.setattr(cli, "_load_bench_main", absent)
    rc = main(["bench"])
    _one_line_error(rc, capsys.readouterr().err, "bench/run.py")


def test_bench_runner_is_found():
    from vskip_kernels.cli import _load_bench_main

    assert callable(_load_bench_main())


def test_demo_end_to_end(capsys):
    """The demo on the shipped model, on a small subset so CI stays within minutes."""
    rc, stdout, err = _run(
        capsys,
        "demo",
        "--quick",
        "--calibration-samples",
        "8",
        "--eval-samples",
        "16",
        "--budgets",
        "3",
        "--no-progress",
    )
    assert rc == 0, err
    lines = stdout.strip().splitlines()
    assert "12 decoder layers, 64 visual tokens per image" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("mode "))
    end = next(i for i, line in enumerate(lines) if line.startswith("per-layer scores"))
    table = [line.split() for line in lines[header + 1 : end]]
    assert [(r[0], r[1]) for r in table] == [("dense", "-")] + [
        (mode, m)
        for mode, first in (("vskip", "vig"), ("frozen", "lc"), ("decode_bypass", "visual_mass"))
        for m in (first, "cosine", "depth", "random")
    ] + [("fastv", "last")] * 4 + [("vtw", "-"), ("fastv+frozen", "lc"), ("fastv+vskip", "vig")]
    # columns from the right: decode ms/tok, prefill ms, KV KiB, FLOPs %, agree, vs dense, accuracy
    dense = table[0]
    assert dense[-6] == "+0.0" and dense[-5] == "100.0%" and dense[-4] == "100.0%"  # agrees with itself; all FLOPs
    dense_kv = float(dense[-3])
    for row in table[1:13]:
        assert row[2] == "3"
        layers = json.loads(" ".join(row[3:-7]))
        assert len(layers) == 3 and all(0 <= i < 12 for i in layers)
    pruned = table[13:]
    assert [" ".join(r[3:5]) for r in pruned] == [f"K={k} keep={r:g}" for k in (2, 4) for r in (0.5, 0.25)] + [
        "K=6 keep=0",
        "K=2 keep=0.5",
        "K=2 keep=0.5",
    ]
    for row in pruned:  # counted: pruning saves prefill FLOPs and KV cache
        assert float(row[-4].rstrip("%")) < 100 and float(row[-3]) < dense_kv
    for row in pruned[-2:]:  # FastV, then layers calibrated on the pruned model
        layers = json.loads(" ".join(row[5:-7]))
        assert row[2] == "3" and len(layers) == 3
    # decode steps are timed directly: never the 0.00 that a clamped difference of two runs gave
    assert all(float(row[-1]) > 0 and float(row[-2]) > 0 for row in table)
    assert " thread" in lines[0]
    assert len(lines) - end - 2 == 12  # one score line per decoder layer
    assert "\r" not in err and "it/s" not in err  # no progress bars when asked for none


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--budgets", "0"], "budgets must be ints in [1, 11]"),
        (["--budgets", "12"], "budgets must be ints in [1, 11]"),
        (["--eval-samples", "0"], "eval_samples must be a positive int"),
        (["--threads", "0"], "threads must be a positive int"),
    ],
    ids=["budgets=0", "budgets=12", "eval_samples=0", "threads=0"],
)
def test_demo_bad_arguments(capsys, argv, needle):
    _one_line_error(*_run(capsys, "demo", *argv, "--no-progress")[::2], needle)


def test_demo_bad_budgets_syntax(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--budgets", "two"])
    assert "comma-separated ints" in capsys.readouterr().err


def test_demo_plot_without_matplotlib(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    rc, _, err = _run(capsys, "demo", "--plot", tmp_path / "out.png", "--no-progress")
    _one_line_error(rc, err, "pip install matplotlib")


def test_demo_plot_bad_folder(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    rc, _, err = _run(capsys, "demo", "--plot", tmp_path / "missing" / "out.png", "--no-progress")
    _one_line_error(rc, err, "output folder does not exist")


def test_demo_model_folder_missing(capsys, tmp_path):
    _one_line_error(*_run(capsys, "demo", "--model", tmp_path / "nope", "--no-progress")[::2], "model folder not found")


def test_module_entry_point_error_exit(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "vskip_kernels", "generate", "--model", str(tmp_path / "none"), "--prompt", "x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("vskip: error: model folder not found")
    assert "Traceback" not in proc.stderr
