"""The benchmark suite in smoke mode on CPU: output schema, derived numbers, README table.

No timing is asserted; ratios are checked against the measured times they come from.
"""

import json
import os

import pytest
import torch

from vskip_kernels.bench import run
from vskip_kernels.bench import table as make_table
from vskip_kernels.bench.common import (
    RESULT_FIELDS,
    allowed_entries,
    attention_flops,
    fill_speedups,
    summarize,
    time_fn,
    write_results,
)
from vskip_kernels.reference import allowed_mask, token_kind


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    paths = run.main(["--smoke", "--out", str(out)])
    docs = {}
    for p in paths:
        with open(p) as f:
            doc = json.load(f)
        docs[doc["suite"]] = doc
    return out, paths, docs


def test_every_suite_writes_one_file_under_smoke(smoke_run):
    out, paths, docs = smoke_run
    assert sorted(docs) == sorted(run.SUITES)
    for p in paths:
        assert os.path.dirname(p) == os.path.join(str(out), "smoke")
        assert os.path.basename(p).startswith(json.load(open(p))["suite"] + "-cpu-")


def test_schema_and_speedups_come_from_measured_times(smoke_run):
    _, _, docs = smoke_run
    for suite, d in docs.items():
        assert d["smoke"] is True and d["format"] == "vskip-bench/1"
        for key in ("suite", "env", "shapes", "cases", "checks", "settings", "notes"):
            assert key in d, (suite, key)
        assert d["env"]["device"] == "cpu" and d["env"]["gpu"] is None
        assert "hostname" not in json.dumps(d["env"]).lower()
        assert d["cases"], suite
        for case in d["cases"]:
            assert case["results"], (suite, case["case"], case["skipped"])
            for s in case["skipped"]:
                assert s["backend"] and s["reason"]
            for r in case["results"]:
                for field in RESULT_FIELDS:
                    assert field in r, (suite, case["case"], field)
                assert r["ms_p20"] <= r["ms_median"] <= r["ms_p80"]
                assert r["peak_mem_bytes"] is None  # CPU: no honest allocator statistic
                others = {o["backend"]: o for o in case["results"] if o is not r}
                assert set(r["speedup_vs"]) == set(others)
                for name, ratio in r["speedup_vs"].items():
                    assert ratio == pytest.approx(others[name]["ms_median"] / r["ms_median"], rel=1e-12)


def test_attention_suite_content(smoke_run):
    _, _, docs = smoke_run
    d = docs["attention"]
    policies = {c["policy"] for c in d["cases"]}
    assert policies == {"dense", "vskip", "frozen"}
    fractions = {c["policy"]: c["live_tile_fraction"] for c in d["cases"]}
    assert fractions["dense"] == 1.0
    assert 0 < fractions["frozen"] < fractions["vskip"] < 1.0
    for c in d["cases"]:
        names = {r["backend"] for r in c["results"]}
        # CPU smoke times the torch backend; the triton one is recorded as skipped, with why
        assert "ours-torch" in names, c["skipped"]
        assert any(s["backend"] == "ours-triton" and "interpreter" in s["reason"] for s in c["skipped"])
        assert ("sdpa" if c["policy"] == "dense" else "sdpa (bool mask)") in names
        assert "eager" in names
        shape = next(s for s in d["shapes"] if s["name"] == c["shape"])
        mine = next(r for r in c["results"] if r["backend"] == "ours-torch")
        flops = attention_flops(c["allowed_entries"], shape["heads_q"], shape["head_dim"])
        assert mine["tflops"] == pytest.approx(flops / (mine["ms_median"] * 1e-3) / 1e12)
        assert c["allowed_entries"] <= c["dense_entries"]


def test_visual_mass_and_decode_content(smoke_run):
    _, _, docs = smoke_run
    tasks = {c["task"] for c in docs["visual_mass"]["cases"]}
    assert tasks == {"mass-all", "mass-last", "attention+mass", "rank-last", "rank-all"}
    names = {r["backend"] for c in docs["visual_mass"]["cases"] for r in c["results"]}
    assert {"ours-torch", "ours-torch attention + fused mass"} <= names
    for c in docs["visual_mass"]["cases"]:
        if c["task"].startswith("rank"):  # FastV's ranking: ours against eager output_attentions
            got = {r["backend"] for r in c["results"]}
            assert got == {"ours-torch", "eager probs (output_attentions) + received mean"}, got
    for c in docs["decode"]["cases"]:
        for r in c["results"]:
            assert r["gbps"] == pytest.approx(c["kv_bytes"] / (r["ms_median"] * 1e-3) / 1e9)


def test_model_suite_content(smoke_run):
    _, _, docs = smoke_run
    (case,) = docs["model"]["cases"]
    dense = next(r for r in case["results"] if r["backend"] == "dense (sdpa)")
    assert dense["avg_output_len"] == 4 and dense["decode_mode"].startswith("eager")
    covered = {r["backend"] for r in case["results"]} | {s["backend"] for s in case["skipped"]}
    assert len(covered) == 11  # every method is either measured or skipped with a reason
    combined = next(r for r in case["results"] if r["method"]["kind"] == "shortv+vskip")
    assert not set(combined["plan"]["frozen"]) & set(combined["plan"]["vskip"])
    assert sorted(combined["plan"]["frozen"] + combined["plan"]["vskip"]) == list(range(4))
    # counted cost beside the times: pruning at K=2 cuts prefill FLOPs and the KV cache
    fastv = next(r for r in case["results"] if r["method"]["kind"] == "fastv")
    assert fastv["plan"]["prune"] == [{"layer": 2, "keep": 0.5, "rank": "last"}]
    assert dense["decoder_flops_pct_of_dense"] == 100.0
    assert fastv["decoder_flops_pct_of_dense"] < 100 and fastv["kv_cache_bytes"] < dense["kv_cache_bytes"]
    for r in case["results"]:
        assert r["ttft_ms"] == r["ms_median"]
        assert r["throughput_tok_s"] == pytest.approx(r["avg_output_len"] / (r["total_ms"] * 1e-3))
        if r is not dense:
            assert r["vs_dense"]["ttft_speedup"] == pytest.approx(dense["ttft_ms"] / r["ttft_ms"])


@pytest.mark.parametrize("policy", ["dense", "vskip", "frozen"])
@pytest.mark.parametrize("visual_self", [True, False])
def test_allowed_entries_matches_reference_mask(policy, visual_self):
    g = torch.Generator().manual_seed(3)
    is_visual = torch.rand(3, 37, generator=g) < 0.6
    am = (torch.rand(3, 37, generator=g) < 0.85).int()
    for nq in (37, 11, 1):
        want = int(allowed_mask(is_visual, am, nq, policy, visual_self).sum())
        assert allowed_entries(token_kind(is_visual, am), nq, policy, visual_self) == want


def test_timing_helpers():
    t = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.ms_median, t.ms_p20, t.ms_p80) == (3.0, 1.8, 4.2)
    calls = []
    t = time_fn(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=3)
    assert len(calls) == 5 and len(t.samples) == 3
    res = fill_speedups([{"backend": "a", "ms_median": 2.0}, {"backend": "b", "ms_median": 6.0}])
    assert res[0]["speedup_vs"] == {"b": 3.0} and res[1]["speedup_vs"] == {"a": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="repeats"):
        time_fn(lambda: None, torch.device("cpu"), repeats=0)


def test_runner_rejects_unknown_suite():
    with pytest.raises(SystemExit):
        run.parse_args(["attentoin"])


README = "# Project\n\nintro\n\n## Performance\n\n<!-- bench:start -->\nold text\n<!-- bench:end -->\n\ntail\n"


def _readme(tmp_path):
    p = tmp_path / "README.md"
    p.write_text(README)
    return p


def test_make_table_without_gpu_results(tmp_path, smoke_run):
    out, paths, _ = smoke_run
    readme = _readme(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    for results in (empty, out):  # out holds only smoke/ (CPU) results
        make_table.main(["--results", str(results), "--readme", str(readme), "--no-plots"])
        text = readme.read_text()
        assert make_table.NO_RESULTS in text and "old text" not in text
        assert text.startswith("# Project\n\nintro\n\n## Performance\n\n<!-- bench:start -->\n")
        assert text.endswith("<!-- bench:end -->\n\ntail\n")
    # a CPU (non-smoke) result placed at the top level is not a GPU result either
    cpu_doc = json.load(open(paths[0]))
    cpu_doc["smoke"] = False
    (empty / "cpu.json").write_text(json.dumps(cpu_doc))
    make_table.main(["--results", str(empty), "--readme", str(readme), "--no-plots"])
    assert make_table.NO_RESULTS in readme.read_text()


def _synthetic_gpu_env():
    # SYNTHETIC TEST DATA: exists only inside this test, never written to bench/results
    return {
        "device": "cuda",
        "gpu": "Synthetic Test GPU",
        "gpu_capability": "sm90",
        "driver_version": "0",
        "cuda": "0",
        "torch": "test",
        "triton": "test",
        "transformers": "test",
        "git_commit": "0" * 40,
        "git_dirty": False,
    }


def test_make_table_renders_synthetic_gpu_results(tmp_path):
    results = tmp_path / "results"
    env = _synthetic_gpu_env()
    r_ours = {
        "backend": "ours-triton",
        "ms_median": 2.0,
        "ms_p20": 1.9,
        "ms_p80": 2.1,
        "tflops": 111.0,
        "peak_mem_bytes": 1 << 20,
        "speedup_vs": {},
    }
    r_fa = {
        "backend": "flash-attn-2",
        "ms_median": 5.0,
        "ms_p20": 4.9,
        "ms_p80": 5.1,
        "tflops": 44.0,
        "peak_mem_bytes": 1 << 20,
        "speedup_vs": {},
    }
    case = {
        "case": "synthetic-shape/dense",
        "shape": "synthetic-shape",
        "policy": "dense",
        "live_tile_fraction": 1.0,
        "results": fill_speedups([r_ours, r_fa]),
        "skipped": [{"backend": "eager", "reason": "out of memory: synthetic"}],
    }
    shape = {"name": "synthetic-shape", "seq_len": 1000}
    chk = {
        "name": "dense vs flash-attn-2 (speed ratio)",
        "value": 2.5,
        "target": ">= 0.9",
        "passed": True,
        "shape": "synthetic-shape",
    }
    write_results(str(results), "attention", env, [shape], [case], smoke=False, checks=[chk])
    readme = _readme(tmp_path)
    make_table.main(["--results", str(results), "--readme", str(readme), "--no-plots"])
    text = readme.read_text()
    section = text[text.index(make_table.START) : text.index(make_table.END)]
    assert make_table.NO_RESULTS not in section and "old text" not in section
    assert "Synthetic Test GPU" in section
    row = next(line for line in section.splitlines() if line.startswith("| synthetic-shape"))
    assert "2.00 [ours-triton]" in row and "5.00 (2.50×)" in row and "skipped" in row
    assert "| pass |" in section
    assert text.endswith("<!-- bench:end -->\n\ntail\n")
    assert make_table.update_readme(str(readme), make_table.render(make_table.load_results(str(results)))) is False
    if _has_matplotlib():
        plots = make_table.make_plots(make_table.load_results(str(results)), str(tmp_path / "plots"))
        assert plots and all(p.endswith(".png") and os.path.getsize(p) > 0 for p in plots)


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_make_table_needs_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="bench:start"):
        make_table.main(["--results", str(tmp_path), "--readme", str(readme), "--no-plots"])


def test_partial_results_are_saved_and_shown_as_partial(tmp_path):
    """A suite stopped by a time limit keeps the shapes it finished: the runner rewrites its
    file after every shape; make_table shows such a file and says it is partial, and ignores
    one with no case yet."""
    results = tmp_path / "results"
    env = _synthetic_gpu_env()
    path = str(results / "attention-x.json")
    r = {
        "backend": "ours-triton",
        "ms_median": 2.0,
        "ms_p20": 1.9,
        "ms_p80": 2.1,
        "tflops": 1.0,
        "peak_mem_bytes": 1,
        "speedup_vs": {},
    }
    case = {
        "case": "s/dense",
        "shape": "s",
        "policy": "dense",
        "live_tile_fraction": 1.0,
        "results": [r],
        "skipped": [],
    }
    write_results(
        str(results), "attention", env, [], [], smoke=False, path=path, created_utc="20260101T000000Z", complete=False
    )
    assert make_table.load_results(str(results)) == []
    write_results(
        str(results),
        "attention",
        env,
        [{"name": "s", "seq_len": 10}],
        [case],
        smoke=False,
        path=path,
        created_utc="20260101T000000Z",
        complete=False,
    )
    assert os.listdir(results) == ["attention-x.json"]  # rewritten in place, no temporary left
    (doc,) = make_table.load_results(str(results))
    assert doc["complete"] is False
    assert "partial" in make_table.render([doc])


def test_runner_checkpoints_every_shape(tmp_path, monkeypatch):
    """run.main saves each suite after every shape: a run killed mid-suite leaves a file."""
    from vskip_kernels.bench import attention as bench_attention

    seen = []
    real = bench_attention.run_shape

    def spy(shape, args, device, dtype):
        files = list((tmp_path / "smoke").glob("attention-*.json"))
        seen.append([json.load(open(f))["complete"] for f in files])
        return real(shape, args, device, dtype)

    monkeypatch.setattr(bench_attention, "run_shape", spy)
    monkeypatch.setattr(
        bench_attention.cases, "SMOKE_ATTENTION_SHAPES", bench_attention.cases.SMOKE_ATTENTION_SHAPES * 2
    )
    (path,) = run.main(["attention", "--smoke", "--out", str(tmp_path), "--repeats", "1", "--warmup", "0"])
    assert seen == [[], [False]]  # before the second shape, the first one is on disk, marked partial
    doc = json.load(open(path))
    assert doc["complete"] is True and len(doc["cases"]) == 6


def test_unknown_shape_names_are_rejected():
    with pytest.raises(SystemExit):
        run.parse_args(["attention", "--shapes", "no-such-shape"])
    with pytest.raises(SystemExit):  # real shape names mean nothing to a smoke run
        run.parse_args(["attention", "--smoke", "--shapes", "llava15-7b"])
    assert run.parse_args(["attention", "visual_mass", "--shapes", "llava15-7b", "mass-n3000"]).shapes


def test_static_cache_decode_path_gives_eager_tokens():
    """The model suite's CUDA-graph decode path (static cache, compile_config) runs on CPU
    too, without the compile (transformers' compile criteria are not met there): with each
    kind of plan applied it generates the tokens of the ordinary dynamic-cache generate."""
    import argparse

    from transformers import StaticCache

    from vskip_kernels.bench import model as bm
    from vskip_kernels.bench.model_configs import SMOKE_MODEL_CASES, build_model, input_ids_for, text_config
    from vskip_kernels.hf import apply_skip_plan

    case = SMOKE_MODEL_CASES[0]
    dev = torch.device("cpu")
    model = build_model(case, dev, torch.float32)
    ids = input_ids_for(model, case, dev)
    plans = {name: plan for name, plan, _ in bm.method_plans(text_config(model).num_hidden_layers, smoke=True)}
    for name in ("flashvlm r=0.2", "shortv N=2 + vskip in the other 2 layers"):
        handle = apply_skip_plan(model, plans[name])
        try:
            eager = bm._generate(model, ids, 5)
            cache = StaticCache(config=model.config, max_cache_len=int(ids.shape[1]) + 5)
            assert torch.equal(bm._generate(model, ids, 5, cache), eager), name
            assert torch.equal(bm._generate(model, ids, 5, cache), eager), name  # the cache is reset and reused
            fields, mode, fallback = bm.time_method(
                model, ids, argparse.Namespace(max_new_tokens=5, model_repeats=1), dev, graphs=True
            )
            assert fallback is None and mode.startswith("static cache") and fields["avg_output_len"] == 5
        finally:
            handle.remove()


def test_make_table_combines_the_parts_of_a_split_run(tmp_path):
    """A run split into parts (one file per shape group) shows every case: the newest result
    of each, with the checks of the run it came from; results of other versions stay out."""
    results = tmp_path / "results"
    env = _synthetic_gpu_env()

    def res(ms):
        return {
            "backend": "ours-triton",
            "ms_median": ms,
            "ms_p20": ms,
            "ms_p80": ms,
            "tflops": 1.0,
            "peak_mem_bytes": 1,
            "speedup_vs": {},
        }

    def doc(created, shape_ms, env=env):
        cases = [
            {
                "case": f"{s}/dense",
                "shape": s,
                "policy": "dense",
                "live_tile_fraction": 1.0,
                "results": [res(ms)],
                "skipped": [],
            }
            for s, ms in shape_ms
        ]
        checks = [{"name": "t", "value": ms, "target": ">= 0", "passed": True, "shape": s} for s, ms in shape_ms]
        write_results(
            str(results),
            "attention",
            env,
            [{"name": s, "seq_len": 100} for s, _ in shape_ms],
            cases,
            smoke=False,
            checks=checks,
            created_utc=created,
        )

    doc("20260101T000000Z", [("a", 1.0), ("b", 2.0)])
    doc("20260101T000100Z", [("b", 3.0), ("c", 4.0)])
    doc("20260101T000200Z", [("d", 5.0)], env=dict(env, torch="other"))  # another torch: not combined
    docs = make_table.load_results(str(results))
    (merged,) = make_table.latest(docs)
    assert merged["env"]["torch"] == "other" and [c["shape"] for c in merged["cases"]] == ["d"]
    (merged,) = make_table.latest([d for d in docs if d["env"]["torch"] == "test"])
    by_shape = {c["shape"]: c["results"][0]["ms_median"] for c in merged["cases"]}
    assert by_shape == {"a": 1.0, "b": 3.0, "c": 4.0}  # b from the newer run
    assert sorted((ch["shape"], ch["value"]) for ch in merged["checks"]) == [("a", 1.0), ("b", 3.0), ("c", 4.0)]
    header = make_table.header_line(merged)
    assert header.count(".json`") == 2 and "newest result of each case" in header
