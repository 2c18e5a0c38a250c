"""The benchmark suites run from an installed package, away from a source checkout: `vskip
bench` finds its runner inside the package, results land in ./vskip_bench_results (or
--out), the git commit is recorded when known and null otherwise, and importing the suites
needs neither matplotlib nor pytest-benchmark."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vskip_kernels
from vskip_kernels.bench import baselines, common, run
from vskip_kernels.cli import main as cli_main
from vskip_kernels.reference import allowed_mask

PKG = Path(vskip_kernels.__file__).resolve().parent
CHECKOUT = PKG.parent
SMOKE_ATTENTION = ["attention", "--smoke", "--repeats", "1", "--warmup", "0"]


def _installed_copy(tmp_path) -> Path:
    """The package alone in a site-packages-like folder, as `pip install .` leaves it: no
    bench/ folder next to it, no git work tree around it."""
    site = tmp_path / "site"
    shutil.copytree(PKG, site / "vskip_kernels", ignore=shutil.ignore_patterns("__pycache__", "weights", "*.egg-info"))
    return site


def _child_env(site: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(site)
    env.pop("VSKIP_GIT_COMMIT", None)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _one_result(folder: Path, suite: str) -> dict:
    (path,) = folder.glob(f"{suite}-*.json")
    doc = json.loads(path.read_text())
    assert doc["format"] == "vskip-bench/1" and doc["suite"] == suite and doc["complete"] is True
    assert doc["cases"] and all(case["results"] for case in doc["cases"])
    return doc


def test_vskip_bench_runs_from_an_installed_copy_outside_the_checkout(tmp_path):
    """`vskip bench attention --smoke` with only an installed copy of the package importable
    and a working directory that is no source checkout (the case that used to stop with
    "run from a source checkout")."""
    site = _installed_copy(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    code = (
        "import sys, vskip_kernels\n"
        f"assert vskip_kernels.__file__.startswith({str(site)!r}), vskip_kernels.__file__\n"
        "from vskip_kernels.cli import main\n"
        "sys.exit(main(['bench', *sys.argv[1:]]))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, *SMOKE_ATTENTION],
        cwd=work,
        env=_child_env(site),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(os.listdir(work)) == ["vskip_bench_results"]
    doc = _one_result(work / "vskip_bench_results" / "smoke", "attention")
    assert doc["env"]["git_commit"] is None and doc["env"]["git_dirty"] is None  # no checkout: unknown
    assert doc["env"]["vskip_kernels"] == vskip_kernels.__version__


def test_python_m_runner_and_explicit_out(tmp_path):
    """`python -m vskip_kernels.bench` is the same runner; --out wins over the default, and a
    commit named in VSKIP_GIT_COMMIT is recorded where no git work tree is found."""
    site = _installed_copy(tmp_path)
    work, out = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    env = _child_env(site)
    env["VSKIP_GIT_COMMIT"] = "f" * 40
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "vskip_kernels.bench",
            "decode",
            "--smoke",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--out",
            str(out),
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert os.listdir(work) == []
    doc = _one_result(out / "smoke", "decode")
    assert doc["env"]["git_commit"] == "f" * 40


def test_cli_bench_in_process_writes_under_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["bench", *SMOKE_ATTENTION]) == 0
    _one_result(tmp_path / run.INSTALLED_OUT / "smoke", "attention")


def test_default_results_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run.parse_args(["attention"]).out == "vskip_bench_results"
    assert run.parse_args(["attention", "--out", "x"]).out == "x"
    if run.is_source_checkout(str(CHECKOUT)):  # tests run against a source checkout
        monkeypatch.chdir(CHECKOUT)
        assert run.parse_args(["attention"]).out == os.path.join("bench", "results")


def test_git_commit_is_recorded_when_known_and_null_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("VSKIP_GIT_COMMIT", raising=False)
    if common.source_root() is not None:  # a git checkout: its HEAD
        commit, dirty = common.git_state()
        assert re.fullmatch(r"[0-9a-f]{40}", commit) and isinstance(dirty, bool)
    monkeypatch.setattr(common, "_TREE", str(tmp_path))  # as if installed: no work tree of its own
    assert common.source_root() is None
    assert common.git_state() == (None, None)
    monkeypatch.setenv("VSKIP_GIT_COMMIT", "abc123")
    assert common.git_state() == ("abc123", None)
    assert common.environment(torch.device("cpu"))["git_commit"] == "abc123"


def test_importing_the_suites_needs_no_plotting_or_pytest_benchmark():
    code = (
        "import sys\n"
        "import vskip_kernels.bench, vskip_kernels.bench.run, vskip_kernels.bench.table\n"
        "from vskip_kernels.bench import attention, visual_mass, decode, model, baselines, cases, common\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'pytest_benchmark', 'pytest'))\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(CHECKOUT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("policy", ["dense", "vskip", "frozen"])
@pytest.mark.parametrize("visual_self", [True, False])
def test_baseline_mask_is_the_reference_mask(policy, visual_self):
    """The SDPA/eager baselines' explicit mask (built from the library's FlexAttention
    mask_mod, as the package may not import the spec) is the spec's allowed_mask."""
    g = torch.Generator().manual_seed(5)
    is_visual = torch.rand(2, 41, generator=g) < 0.6
    for nq in (41, 9, 1):
        got = baselines.bool_mask(is_visual, nq, policy, visual_self)
        want = allowed_mask(is_visual, None, nq, policy, visual_self)[:, None]
        assert got.dtype == torch.bool and torch.equal(got, want), (policy, visual_self, nq)
