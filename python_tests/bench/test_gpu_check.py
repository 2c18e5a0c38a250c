"""bench/gpu_check.py, the one-command GPU run, kept from rotting on CPU: its plan names
real shapes and models, steps fail soft and stop at their caps, the budget is kept, and
the --smoke rehearsal's core (dry-run install without an index, versions, one benchmark
suite) runs end to end and writes what a GPU session brings back.

gpu_check.py is a repository script (the ``gpu_check`` fixture of conftest.py loads it);
the suites it runs are the package's."""

import json
import os
import signal
import sys
import time

import pytest

from vskip_kernels.bench import attention as bench_attention
from vskip_kernels.bench import cases, run
from vskip_kernels.bench.model_configs import MODEL_CASES


def _args(gpu_check, tmp_path, *extra):
    args = gpu_check.build_parser().parse_args(["--out", str(tmp_path), *extra])
    args.out = str(tmp_path)
    args.pytest_workers = 0 if args.pytest_workers is None else args.pytest_workers
    args.test_timeout = 0 if args.test_timeout is None else args.test_timeout
    return args


@pytest.mark.parametrize("smoke", [False, True])
def test_plan_is_in_priority_order_and_parses(tmp_path, smoke, gpu_check):
    steps = gpu_check.plan_steps(_args(gpu_check, tmp_path, *(["--smoke"] if smoke else [])))
    assert [s.name for s in steps] == [
        "install",
        "env",
        "pytest-cuda",
        "static-loaded",
        "attention",
        "visual_mass",
        "decode",
        "model",
        "model-graphs",
    ]
    # what comes back from a device run: at most 8 files (summary, log, junit, one JSON per benchmark step)
    assert 3 + sum(gpu_check.is_benchmark(s) for s in steps) <= 8
    assert [s.group for s in steps] == sorted(s.group for s in steps)
    assert sum(s.cap_s for s in steps) >= gpu_check.DEFAULT_BUDGET_S  # the budget, not the caps, ends the run
    install = steps[0].argv
    assert install[-1] == ("dry-run" if smoke else "real")
    assert {"--no-deps", "--no-build-isolation", "--no-index"} <= set(gpu_check.PIP_INSTALL)
    for s in steps:
        if gpu_check.is_benchmark(s):
            assert s.argv[1:3] == ["-m", "vskip_kernels.bench"]
            parsed = run.parse_args(s.argv[3:])  # exits on an unknown suite, shape or option
            assert parsed.smoke is smoke
            assert parsed.out == os.path.join(str(tmp_path), "results")


def test_benchmark_names_exist(gpu_check):
    assert set(gpu_check.ATTENTION_SHAPES) <= {s.name for s in cases.ATTENTION_SHAPES}
    assert set(gpu_check.MASS_SHAPES) <= {s.name for s in cases.MASS_SHAPES}
    assert set(gpu_check.MODELS) <= {m.name for m in MODEL_CASES}
    # the 32k video shape is in both kernel suites and the model suite
    assert "qwen25vl-7b-video32k" in gpu_check.ATTENTION_SHAPES and "mass-n32768" in gpu_check.MASS_SHAPES
    assert gpu_check.MODELS[:2] == ("llava-next-7b", "qwen2.5-vl-7b-video32k")
    from vskip_kernels.bench.model import FLASHVLM_TARGET_MODEL, METHOD_KEYS

    assert gpu_check.DECODE_MODELS == (FLASHVLM_TARGET_MODEL,)
    assert gpu_check.DECODE_METHODS[:2] == ("dense-sdpa", "flashvlm") and set(gpu_check.DECODE_METHODS) <= set(
        METHOD_KEYS
    )
    # the shapes the kernel targets are stated for (N >= 3k, d128) come first: a stopped suite has them
    first = {s.name: s for s in cases.ATTENTION_SHAPES}[gpu_check.ATTENTION_SHAPES[0]]
    assert first.seq_len >= bench_attention.TARGET_MIN_SEQ and first.head_dim == bench_attention.TARGET_HEAD_DIM
    assert {s.name: s for s in cases.MASS_SHAPES}[gpu_check.MASS_SHAPES[0]].seq_len == 3000


def test_only_and_skip_check_names(tmp_path, gpu_check):
    steps = gpu_check.plan_steps(_args(gpu_check, tmp_path))
    assert [s.name for s in gpu_check.select(steps, ["env", "model"], None)] == ["env", "model"]
    assert "install" not in [s.name for s in gpu_check.select(steps, None, ["install"])]
    with pytest.raises(SystemExit, match="unknown step"):
        gpu_check.select(steps, ["benchmarks"], None)


def test_steps_fail_soft_stop_at_their_cap_and_keep_the_budget(tmp_path, monkeypatch, gpu_check):
    py = sys.executable
    fake = [
        gpu_check.Step("ok", "a", 30, [py, "-c", "print('fine')"], "succeeds", min_s=1),
        gpu_check.Step("fails", "a", 30, [py, "-c", "import sys; print('boom'); sys.exit(3)"], "fails", min_s=1),
        gpu_check.Step(
            "hangs",
            "b",
            2,
            [py, "-c", "import time; print('waiting', flush=True); time.sleep(60)"],
            "outlives its cap",
            min_s=1,
        ),
        gpu_check.Step("after", "b", 30, [py, "-c", "print('still runs')"], "runs after a failure", min_s=1),
        gpu_check.Step("late", "c", 30, [py, "-c", "print('never')"], "needs more than is left", min_s=10_000),
    ]
    monkeypatch.setattr(gpu_check, "plan_steps", lambda args: fake)
    t0 = time.monotonic()
    rc = gpu_check.main(["--out", str(tmp_path), "--budget", "100", "--install", "skip"])
    assert time.monotonic() - t0 < 2 + gpu_check.GRACE_S + 20
    assert rc == 1
    doc = json.load(open(tmp_path / "summary.json"))
    status = {s["name"]: s["status"] for s in doc["steps"]}
    assert status == {"ok": "ok", "fails": "failed", "hangs": "timeout", "after": "ok", "late": "skipped"}
    by_name = {s["name"]: s for s in doc["steps"]}
    assert by_name["fails"]["rc"] == 3 and by_name["hangs"]["rc"] is None
    assert by_name["hangs"]["seconds"] < 2 + gpu_check.GRACE_S + 5
    assert "budget spent" in by_name["late"]["detail"]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "fine" in log and "boom" in log and "waiting" in log and "cap of 2 s reached" in log and "never" not in log


def test_junit_and_result_readers(tmp_path, gpu_check):
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<testsuites><testsuite><testcase classname="m" name="a"/>'
        '<testcase classname="m" name="b"><failure message="x"/></testcase>'
        '<testcase classname="m" name="c"><skipped/></testcase>'
        '<testcase classname="m" name="d"><error message="y"/></testcase></testsuite></testsuites>'
    )
    counts = gpu_check.junit_counts(str(junit))
    assert (counts["passed"], counts["failures"], counts["errors"], counts["skipped"]) == (1, 1, 1, 1)
    assert counts["failing"] == ["m::b", "m::d"]
    assert gpu_check.junit_counts(str(tmp_path / "missing.xml")) is None
    res = tmp_path / "r.json"
    res.write_text(
        json.dumps(
            {
                "suite": "attention",
                "complete": False,
                "shapes": [{}],
                "cases": [{"results": [{}], "skipped": [{"backend": "eager", "reason": "out of memory: x"}]}],
                "checks": [
                    {"name": "t", "value": 0.5, "target": ">= 1", "passed": False, "shape": "s"},
                    {"name": "u", "value": 2.0, "target": ">= 1", "passed": True},
                    {"name": "v", "value": 0.1, "target": ">= 1", "passed": False, "target_applies": False},
                ],
            }
        )
    )
    d = gpu_check.describe_result(str(res))
    assert d["complete"] is False and d["cases"] == 1 and d["checks_pass"] == 1
    assert d["checks_fail"] == ["t [s] = 0.5 (target >= 1)"]  # reference-only checks are not misses
    assert d["skipped"] == ["eager: out of memory: x"]


def test_static_step_is_folded_into_the_summary(tmp_path, gpu_check):
    """The static step in its smoke form (one small kernel family, one target, no GPU to load
    on) runs the real report; its JSON goes into summary.json and its folder is removed, so
    a device run still brings back at most eight files."""
    rc = gpu_check.main(["--smoke", "--out", str(tmp_path), "--only", "static-loaded", "--budget", "200"])
    doc = json.load(open(tmp_path / "summary.json"))
    (step,) = doc["steps"]
    assert rc == 0 and step["status"] == "ok", step
    info = step["info"]["static"]
    assert info["compiles"] == 1 and info["failing"] == [] and list(info["kernels"]) == ["mass_merge@80"]
    assert info["kernels"]["mass_merge@80"]["registers"] > 0
    assert not (tmp_path / gpu_check.STATIC_DIR).exists()


def test_smoke_rehearsal_core(tmp_path, gpu_check):
    """The rehearsal's core end to end: install resolved without an index (dry run),
    versions, and one benchmark suite in its own capped process; at most eight files come
    back, none deeper than two folders."""
    rc = gpu_check.main(["--smoke", "--out", str(tmp_path), "--only", "install", "env", "decode", "--budget", "300"])
    doc = json.load(open(tmp_path / "summary.json"))
    status = {s["name"]: (s["status"], s["detail"]) for s in doc["steps"]}
    assert rc == 0, status
    assert status["install"][0] == "ok" and "without an index" in status["install"][1]
    assert doc["env"]["torch"] and "cuda_available" in doc["env"]
    decode = next(s for s in doc["steps"] if s["name"] == "decode")
    (result,) = decode["info"]["results"]
    assert result["suite"] == "decode" and result["complete"] is True and result["cases"] > 0
    files = [os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert len(files) <= 8 and all(f.count(os.sep) <= 2 for f in files), files
    assert sorted(f for f in files if not f.startswith("results")) == ["gpu_check.log", "summary.json"]


def test_stopped_pytest_step_still_reports_its_tests(tmp_path, monkeypatch, gpu_check):
    """A test step stopped at its cap is interrupted (SIGINT), so pytest still writes the
    junit report of what ran: a timeout on the GPU does not lose the test results."""
    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "test_x.py").write_text(
        "import time\n\ndef test_quick():\n    pass\n\ndef test_slow():\n    time.sleep(120)\n"
    )
    out = tmp_path / "out"
    junit = out / "junit-cuda.xml"
    step = gpu_check.Step(
        "pytest-cuda",
        "a",
        15,
        [
            sys.executable,
            "-m",
            "pytest",
            str(tests / "test_x.py"),
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
        ],
        "tests",
        min_s=1,
    )
    monkeypatch.setattr(gpu_check, "plan_steps", lambda args: [step])
    # as in a shell's background job, SIGINT ignored (inherited through exec): the step still gets it
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert gpu_check.main(["--out", str(out), "--budget", "60"]) == 1
    finally:
        signal.signal(signal.SIGINT, previous)
    (s,) = json.load(open(out / "summary.json"))["steps"]
    assert s["status"] == "timeout"
    assert s["info"]["passed"] == 1 and s["detail"].startswith("1 passed")
