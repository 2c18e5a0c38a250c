"""Paged Triton attention (ops/triton/paged.py) against reference.attention_ref on each request's
contiguous copy: in Triton's interpreter on CPU, natively on a GPU (``cuda`` marker).

Also checks the block sparsity: the count of processed (query tile, cache block) pairs equals
the count of pairs holding an allowed entry, derived from the reference mask."""

from __future__ import annotations

import pytest
import torch

from python_tests._shared import assert_rule
from python_tests.ops._paged import MIXED, make_case, reference
from vskip_kernels.ops.triton import paged as tp
from vskip_kernels.ops.triton.common import count_tiles
from vskip_kernels.reference import allowed_mask

POLICIES = ("dense", "vskip", "frozen")


def _run(case, policy, **kw):
    return tp.paged_attention_triton(
        case["q"],
        case["k_cache"],
        case["v_cache"],
        case["block_table"],
        case["seq_lens"],
        case["query_start_loc"],
        case["slot_kinds"],
        policy=policy,
        **kw,
    )


def _to(case, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def _expected_tiles(case, policy, block_m, visual_self=True):
    bs = case["k_cache"].shape[2]
    total = 0
    for q, k, _v, vis in case["per_req"]:
        n, L = q.shape[2], k.shape[2]
        allowed = allowed_mask(vis, None, n, policy, visual_self)[0]  # [n, L]
        for m0 in range(0, n, block_m):
            rows = allowed[m0 : m0 + block_m]
            for j in range(0, L, bs):
                total += int(rows[:, j : j + bs].any())
    return total * case["q"].shape[1]


# (dtype, head dim, block size, (Hq, Hkv)) rotated over the policies
_CASES = [(torch.float32, 32, 16, (4, 2)), (torch.float16, 64, 16, (4, 1)), (torch.bfloat16, 80, 32, (6, 2))]


@pytest.mark.parametrize("dtype,d,bs,heads", _CASES)
@pytest.mark.parametrize("policy", POLICIES)
def test_interpreter_matches_reference_and_skips_dead_blocks(dtype, d, bs, heads, policy):
    case = make_case(MIXED, hq=heads[0], hkv=heads[1], d=d, bs=bs, dtype=dtype, seed=7)
    with count_tiles(device="cpu") as tiles:
        got = _run(case, policy)
    assert got.dtype == dtype and got.shape == case["q"].shape
    assert_rule(f"paged-triton-{policy}", got, reference(case, policy), reference(case, policy, upcast=False))
    bm = tp.block_m_for(tp.DTYPES[dtype], d)
    assert tiles.value == _expected_tiles(case, policy, bm)


def test_visual_self_false_and_empty_rows_are_zero():
    # an image at the very start: vskip without self leaves its rows with no key at all
    case = make_case([(40, 40, [(0, 20)]), (33, 1, [(0, 33)])], seed=8)
    got = _run(case, "vskip", visual_self=False)
    assert torch.equal(got[:20], torch.zeros_like(got[:20]))
    assert torch.equal(got[40:], torch.zeros_like(got[40:]))
    assert_rule("no-self", got, reference(case, "vskip", False), reference(case, "vskip", False, upcast=False))


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


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32))
@pytest.mark.parametrize("policy", POLICIES)
def test_native_gpu_matches_reference(dtype, policy):
    reqs = MIXED + [(700, 300, [(50, 600)]), (1000, 1, [(10, 900)])]
    case = _to(make_case(reqs, hq=8, hkv=2, d=128, bs=16, dtype=dtype, seed=9), "cuda")
    got = _run(case, policy).cpu()
    cpu = _to(case, "cpu")
    cpu["per_req"] = [tuple(t.cpu() for t in r) for r in case["per_req"]]
    assert_rule(f"gpu-{policy}-{dtype}", got, reference(cpu, policy), reference(cpu, policy, upcast=False))
