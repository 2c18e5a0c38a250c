"""Paged Triton attention (ops/triton/paged.py) against reference.attention_ref on each request's
contiguous copy: in Triton's interpreter on CPU, natively on a GPU (``cuda`` marker).

Also checks the block sparsity: the kernel's tiles are (query tokens x the query heads of one
KV head's group), and each processed (tile, cache block) pair adds the query heads it serves,
so the count equals the (tile of ``tile_tokens`` query tokens, block) pairs holding an allowed
entry x Hq, derived here from the reference mask."""

from __future__ import annotations

import pytest
import torch

from python_tests._shared import assert_rule
from python_tests.ops._paged import DECODE, MIXED, make_case, paged_args, reference
from vskip_kernels.ops.triton import paged as tp
from vskip_kernels.ops.triton.common import count_tiles
from vskip_kernels.reference import allowed_mask

POLICIES = ("dense", "vskip", "frozen")


def _run(case, policy, **kw):
    return tp.paged_attention_triton(
        *paged_args(case),
        policy=policy,
        **kw,
    )


def _to(case, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def _tile_tokens(case):
    """Query tokens per tile of the launch: the launcher's row tile for this batch, divided
    among the heads of a GQA group."""
    q, hkv = case["q"], case["k_cache"].shape[1]
    group = q.shape[1] // hkv
    max_len = max(qq.shape[2] for qq, *_ in case["per_req"])
    rows = tp.tile_rows(tp.DTYPES[q.dtype], q.shape[2], group, max_len)
    return tp.tile_tokens(group, rows)


def _expected_tiles(case, policy, block_q, visual_self=True):
    """(tile of block_q query tokens, cache block) pairs with an allowed entry, x Hq."""
    bs = case["k_cache"].shape[2]
    total = 0
    for q, k, _v, vis in case["per_req"]:
        n, L = q.shape[2], k.shape[2]
        allowed = allowed_mask(vis, None, n, policy, visual_self)[0]  # [n, L]
        for m0 in range(0, n, block_q):
            rows = allowed[m0 : m0 + block_q]
            for j in range(0, L, bs):
                total += int(rows[:, j : j + bs].any())
    return total * case["q"].shape[1]


def _check(case, policy, name, **kw):
    with count_tiles(device="cpu") as tiles:
        got = _run(case, policy, **kw)
    assert got.dtype == case["q"].dtype and got.shape == case["q"].shape
    vs = kw.get("visual_self", True)
    assert_rule(name, got, reference(case, policy, vs), reference(case, policy, vs, upcast=False))
    assert tiles.value == _expected_tiles(case, policy, _tile_tokens(case), vs)
    return got


# (dtype, head dim, block size, (Hq, Hkv), requests) rotated over the policies. fp16/bf16 batches
# with a long chunk run the prefill tile (64 rows at D=64, 128 at D=80), the others the 16-row tile.
_CASES = [
    (torch.float32, 32, 16, (4, 2), MIXED),  # fp32 FMA dots, GQA 2
    (torch.float16, 64, 16, (4, 1), MIXED),  # GQA 4, 64-row tiles of 16 tokens
    (torch.bfloat16, 80, 32, (6, 2), MIXED),  # GQA 3, head-dim mask, 128-row tiles of 42 tokens
    # GQA 7 (Qwen2-VL 7B's: two tokens per 16-row tile), D=256, 64-slot blocks in 16-key steps;
    # chunked prefill after an image and decode rows (the interpreter is slow at D=256)
    (torch.float16, 256, 64, (14, 2), MIXED[1:4]),
]


@pytest.mark.parametrize("dtype,d,bs,heads,reqs", _CASES)
@pytest.mark.parametrize("policy", POLICIES)
def test_interpreter_matches_reference_and_skips_dead_blocks(dtype, d, bs, heads, reqs, policy):
    case = make_case(reqs, hq=heads[0], hkv=heads[1], d=d, bs=bs, dtype=dtype, seed=7)
    _check(case, policy, f"paged-triton-{policy}")


# Decode batches (16-row tiles): GQA 7 puts two tokens' 7 heads in a tile; a group of 20
# heads is split over two head chunks of 16 and 4.
@pytest.mark.parametrize("heads,bs", [((7, 1), 32), ((20, 1), 64)])
@pytest.mark.parametrize("policy", ("vskip", "frozen"))
def test_interpreter_decode_batches(heads, bs, policy):
    case = make_case(DECODE, hq=heads[0], hkv=heads[1], d=64, bs=bs, dtype=torch.float16, seed=11)
    assert _tile_tokens(case) == tp.DECODE_ROWS // min(heads[0] // heads[1], tp.DECODE_ROWS)
    _check(case, policy, f"paged-decode-{policy}")


def test_visual_self_false_and_empty_rows_are_zero():
    # an image at the very start: vskip without self leaves its rows with no key at all
    case = make_case([(40, 40, [(0, 20)]), (33, 1, [(0, 33)])], seed=8)
    got = _check(case, "vskip", "no-self", visual_self=False)
    assert torch.equal(got[:20], torch.zeros_like(got[:20]))
    assert torch.equal(got[40:], torch.zeros_like(got[40:]))


def test_bad_arguments_name_the_argument():
    case = make_case([(20, 20, [])], bs=16)
    with pytest.raises(ValueError, match="block_size"):
        c = make_case([(20, 20, [])], bs=8)
        _run(c, "dense")
    with pytest.raises(ValueError, match="policy"):
        _run(case, "sparse")
    with pytest.raises(ValueError, match="dtype"):
        tp.paged_attention_triton(
            case["q"].half(),
            case["k_cache"],
            case["v_cache"],
            case["block_table"],
            case["seq_lens"],
            case["query_start_loc"],
            case["slot_kinds"],
        )


def test_aot_specs_cover_every_launch_config():
    """Every (dtype, head dim, block size, row tile) the launcher can pick has an AOT spec with
    the launcher's constexprs and launch options, so the static gate checks what runs."""
    specs = {s.name: s for s in tp.aot_specs()}
    for dtype in ("fp16", "bf16", "fp32"):
        for d in tp.AOT_HEAD_DIMS:
            for bs in tp.BLOCK_SIZES:
                for group, max_len in ((1, 1), (4, 1), (7, 2), (1, 512), (4, 4096), (20, 64)):
                    bm = tp.tile_rows(dtype, d, group, max_len)
                    spec = specs[f"paged_{dtype}_d{d}_bs{bs}_m{bm}"]
                    cfg = tp.kernel_config(dtype, d, bs, bm)
                    assert (spec.num_warps, spec.num_stages) == (cfg["num_warps"], cfg["num_stages"])
                    assert spec.constexprs["BLOCK_M"] == bm and spec.constexprs["TILE_N"] == cfg["TILE_N"]
                    assert tp.tile_heads(group, bm) * tp.tile_tokens(group, bm) <= bm
    assert len(specs) == len(tp.aot_configs())


@pytest.mark.cuda
@pytest.mark.parametrize("heads,bs", [((8, 2), 16), ((28, 4), 32)])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32))
@pytest.mark.parametrize("policy", POLICIES)
def test_native_gpu_matches_reference(dtype, policy, heads, bs):
    reqs = MIXED + [(700, 300, [(50, 600)]), (1000, 1, [(10, 900)])]
    case = _to(make_case(reqs, hq=heads[0], hkv=heads[1], d=128, bs=bs, dtype=dtype, seed=9), "cuda")
    got = _run(case, policy).cpu()
    cpu = _to(case, "cpu")
    cpu["per_req"] = [tuple(t.cpu() for t in r) for r in case["per_req"]]
    assert_rule(f"gpu-{policy}-{dtype}", got, reference(cpu, policy), reference(cpu, policy, upcast=False))
