"""``vskip bench static`` (vskip_kernels/bench/static_report.py): one real report end to end on
a small kernel family, and its tables and comparisons on hand-made documents."""

from __future__ import annotations

import json

import pytest

from vskip_kernels.bench import run, static_report


def _kernel(name, cc, regs=96, spill=0, loop=400, loaded=None, violations=()):
    return {
        "name": name,
        "cc": cc,
        "family": name.split("_")[0] if not name.startswith("vllm") else "vllm_unified",
        "dtype": "fp16",
        "registers": regs,
        "spill_stores": spill,
        "spill_loads": spill,
        "local": 2 if spill else 0,
        "shared": 32768,
        "ctas_per_sm": 2,
        "warps_per_sm": 8,
        "occupancy": 0.125,
        "limiter": "registers",
        "mma": 40,
        "loop_mma": 32,
        "async_copy": 8,
        "loop_instructions": loop,
        "loaded": loaded,
        "violations": list(violations),
    }


def test_report_end_to_end_on_one_family(tmp_path):
    """The runner's ``static`` subcommand compiles for real (one family, one target) and
    writes a partial report that the tables ignore."""
    (path,) = run.main(["static", "--only", "mass_merge", "--targets", "80", "--out", str(tmp_path), "--workers", "1"])
    doc = json.load(open(path))
    assert doc["format"] == static_report.FORMAT and doc["complete"] is False
    (key,) = doc["kernels"]
    r = doc["kernels"][key]
    assert key == "mass_merge@80" and r["family"] == "mass_merge" and r["violations"] == []
    assert r["registers"] > 0 and r["spill_stores"] == 0
    assert doc["summary"]["mass_merge"]["sm80"]["compiles"] == 1
    assert "ptxas_sm80" in doc["env"]["tools"]
    assert static_report.latest_report(str(tmp_path)) is None  # partial: not a table source


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--only"):
        static_report.main(["--only", "no_such_kernel", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--targets"):
        static_report.main(["--targets", "75", "--out", str(tmp_path)])


def test_tables_and_peer_ratio(tmp_path):
    kernels = {
        "paged_fp16_d128_bs16_m16@80": _kernel("paged_fp16_d128_bs16_m16", 80, loop=440),
        # the prefill tile of the same shape is not what vLLM's decode launch is compared with
        "paged_fp16_d128_bs16_m128@80": _kernel("paged_fp16_d128_bs16_m128", 80, loop=999),
        "attn_fp16_d128_m64n64_w4s2@86": _kernel("attn_fp16_d128_m64n64_w4s2", 86, 255, 16, violations=["spills"]),
    }
    peer = {
        "vllm": "0.32.0",
        "kernels": {
            "vllm_unified_fp16_d128_bs16_g1@80": {
                **_kernel("vllm_unified_fp16_d128_bs16_g1", 80, loop=800),
                "head_dim": 128,
                "block_size": 16,
                "group": 1,
                "tile_size": 32,
            }
        },
    }
    doc = {
        "format": static_report.FORMAT,
        "created_utc": "20261204T000000Z",
        "complete": True,
        "seconds": 12.0,
        "env": {"triton": "3.9.0", "tools": {"ptxas_sm80": "ptxas 12.9"}, "git_commit": "abc", "cpu_count": 2},
        "summary": static_report.summarize(kernels),
        "kernels": kernels,
        "peer": peer,
    }
    (tmp_path / "static-triton3.9.0-20261204T000000Z.json").write_text(json.dumps(doc))
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{static_report.START}\nold\n{static_report.END}\nafter\n")
    static_report.render_readme(str(tmp_path), str(readme))
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert "| `attn` | — | 1/1, 255 regs, 8 warps |" in text
    assert "`attn_fp16_d128_m64n64_w4s2` on sm86: spills" in text
    # ours: 440 instructions per 16-key block; vLLM: 800 per 32-key tile -> (440/16)/(800/32) = 1.10
    assert "| fp16 d128 block 16 GQA 1 | sm80 | 96 / 96 | 0 / 0 | 440 (16 keys) | 800 (32 keys) | 1.10 |" in text


def test_loaded_kernels_compared_with_ptxas_and_the_committed_report():
    here = {
        "a@90": _kernel("attn_a", 90, regs=128, loaded={"n_regs": 128, "n_spills": 0}),
        "b@90": _kernel("attn_b", 90, regs=200, loaded={"n_regs": 168, "n_spills": 0}),
        "c@90": _kernel("attn_c", 90, regs=100, loaded={"n_regs": 100, "n_spills": 0}),
    }
    committed = {
        "kernels": {"a@90": {"registers": 128, "spill_stores": 0}, "b@90": {"registers": 200, "spill_stores": 8}}
    }
    got = static_report.compare_loaded(here, committed)
    assert got["compared"] == 3
    assert got["mismatch_here"] == ["b@90"]
    assert len(got["mismatch_committed"]) == 1 and got["mismatch_committed"][0].startswith("b@90")
    assert got["not_in_committed"] == ["c@90"]
