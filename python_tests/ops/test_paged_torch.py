"""Paged PyTorch attention (ops/pytorch/paged.py, the vLLM backend's CPU path) against
reference.attention_ref on each request's contiguous copy."""

from __future__ import annotations

import pytest
import torch

from python_tests._shared import assert_rule
from python_tests.ops._paged import MIXED, make_case, paged_args, reference
from vskip_kernels.ops.pytorch.paged import paged_attention_torch

POLICIES = ("dense", "vskip", "frozen")


def _run(case, policy, **kw):
    return paged_attention_torch(
        *paged_args(case),
        policy=policy,
        **kw,
    )


@pytest.mark.parametrize("visual_self", (True, False))
@pytest.mark.parametrize("policy", POLICIES)
def test_mixed_batch_matches_reference(policy, visual_self):
    case = make_case(MIXED, seed=1)
    got = _run(case, policy, visual_self=visual_self)
    assert got.shape == case["q"].shape and got.dtype == case["q"].dtype
    assert_rule(
        f"paged-{policy}", got, reference(case, policy, visual_self), reference(case, policy, visual_self, upcast=False)
    )


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_low_precision_within_rule(dtype):
    case = make_case(MIXED[:3], dtype=dtype, seed=2, hq=6, hkv=2, d=64, bs=32)
    for policy in POLICIES:
        got = _run(case, policy)
        assert got.dtype == dtype
        assert_rule(f"paged-{policy}-{dtype}", got, reference(case, policy), reference(case, policy, upcast=False))


def test_frozen_visual_rows_are_zero_and_row_live_switches_rows_off():
    case = make_case([(40, 40, [(4, 30)])], seed=3)
    out = _run(case, "frozen")
    assert torch.equal(out[4:30], torch.zeros_like(out[4:30]))
    assert out[30:].abs().sum() > 0
    live = torch.ones(40, dtype=torch.bool)
    live[35:] = False
    out2 = _run(case, "dense", row_live=live)
    assert torch.equal(out2[35:], torch.zeros_like(out2[35:]))
    ref = reference(case, "dense")
    assert torch.allclose(out2[:35], ref[:35], atol=1e-5)


def test_never_reads_unused_blocks_or_garbage():
    # Garbage blocks hold huge values and visual kinds: a read of any would show in the output.
    case = make_case(MIXED, seed=4, spare_blocks=6)
    for policy in POLICIES:
        got = _run(case, policy)
        assert torch.isfinite(got).all()
        assert_rule(policy, got, reference(case, policy), reference(case, policy, upcast=False))


def test_vskip_visual_rows_skip_visual_blocks():
    # A visual query group must not touch blocks that hold only visual keys (other than its own):
    # poison such a block with NaN; the visual rows' output stays finite and correct.
    case = make_case([(96, 16, [(0, 96)])], seed=5, bs=16)
    case["slot_kinds"][:] = case["slot_kinds"]  # kinds as laid out
    ref = reference(case, "vskip")
    first = int(case["block_table"][0, 0])
    case["k_cache"][first] = float("nan")
    got = _run(case, "vskip")
    assert torch.isfinite(got).all()
    assert torch.allclose(got, ref, atol=1e-5)


def test_bad_arguments_name_the_argument():
    case = make_case([(20, 20, [])])
    with pytest.raises(ValueError, match="policy"):
        _run(case, "sparse")
    with pytest.raises(ValueError, match="slot_kinds"):
        paged_attention_torch(
            case["q"],
            case["k_cache"],
            case["v_cache"],
            case["block_table"],
            case["seq_lens"],
            case["query_start_loc"],
            case["slot_kinds"].int(),
        )
    with pytest.raises(ValueError, match="k_cache"):
        paged_attention_torch(
            case["q"],
            case["k_cache"][..., :8],
            case["v_cache"],
            case["block_table"],
            case["seq_lens"],
            case["query_start_loc"],
            case["slot_kinds"],
        )
