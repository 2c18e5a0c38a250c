"""plan_schedule against the mask: exact live tiles, full tiles fully allowed, policy invariants, reuse."""

import dataclasses

import pytest
import torch

from vskip_kernels import Schedule, modality_attention, plan_schedule
from vskip_kernels.reference import allowed_mask, live_tile_pairs

BLOCKS = ((16, 16), (32, 64), (64, 32), (64, 64), (128, 64))


def spans(*parts):
    return torch.cat([torch.full((n,), kind == "v") for kind, n in parts])


def batch():
    """Three sequences: prefix/image/suffix, left-padded interleaved images, image first."""
    a = spans(("t", 9), ("v", 120), ("t", 30), ("v", 7), ("t", 33))
    b = torch.cat([torch.zeros(40, dtype=torch.bool), spans(("t", 3), ("v", 64), ("t", 1), ("v", 70), ("t", 21))])
    c = spans(("v", 150), ("t", 49))
    vis = torch.stack([a, b, c])
    mask = torch.ones(vis.shape, dtype=torch.int32)
    mask[1, :40] = 0
    return vis, mask


def full_tiles_from_mask(allowed, bm, bn):
    """[B, Mt, Nt]: tiles lying inside the [Nq, Nk] range whose every entry is allowed."""
    b, nq, nk = allowed.shape
    mt, nt = -(-nq // bm), -(-nk // bn)
    padded = torch.zeros(b, mt * bm, nt * bn, dtype=torch.bool)
    padded[:, :nq, :nk] = allowed
    return padded.view(b, mt, bm, nt, bn).all(dim=4).all(dim=2)


def check_lists(s):
    """Index lists are ascending with the first cnt entries valid, and full / partial are disjoint."""
    for cnt, idx in ((s.full_cnt, s.full_idx), (s.part_cnt, s.part_idx)):
        assert cnt.dtype == idx.dtype == torch.int32
        for b in range(cnt.shape[0]):
            for m in range(cnt.shape[1]):
                valid = idx[b, m, : cnt[b, m]]
                assert (valid[1:] > valid[:-1]).all()
    both = torch.zeros_like(s.full_mask(), dtype=torch.int32)
    for cnt, idx in ((s.full_cnt, s.full_idx), (s.part_cnt, s.part_idx)):
        both += Schedule._mask(cnt, idx).int()
    assert both.max() <= 1


@pytest.mark.parametrize("nq", (None, 77, 1))
@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("visual_self", (True, False))
@pytest.mark.parametrize("policy", ("dense", "vskip", "frozen"))
def test_live_and_full_tiles_match_the_mask(policy, blocks, nq, visual_self):
    vis, mask = batch()
    bm, bn = blocks
    s = plan_schedule(vis, mask, nq=nq, policy=policy, visual_self=visual_self, block_m=bm, block_n=bn, backend="torch")
    allowed = allowed_mask(vis, mask, nq or vis.shape[1], policy, visual_self)
    assert torch.equal(s.live_mask(), live_tile_pairs(allowed, bm, bn))
    assert torch.equal(s.full_mask(), full_tiles_from_mask(allowed, bm, bn))
    assert int(s.live_pairs()) == int(live_tile_pairs(allowed, bm, bn).sum())
    check_lists(s)


def query_tile_kinds(vis, mask, nq, bm):
    """[B, Mt] bool: query tiles made only of visual tokens."""
    kind = torch.where(vis, 2, 1) * mask
    qk = kind[:, -nq:]
    mt = -(-nq // bm)
    padded = torch.zeros(vis.shape[0], mt * bm, dtype=torch.long)
    padded[:, :nq] = qk
    tiles = padded.view(vis.shape[0], mt, bm)
    # a partial last tile counts as visual-only when all its real rows are visual
    return ((tiles == 2) | ((tiles == 0) & (torch.arange(mt * bm).view(mt, bm) >= nq))).all(-1) & (tiles == 2).any(-1)


@pytest.mark.parametrize("blocks", BLOCKS)
def test_vskip_visual_tiles_visit_text_tiles_and_diagonal(blocks):
    vis, mask = batch()
    bm, bn = blocks
    s = plan_schedule(vis, mask, policy="vskip", block_m=bm, block_n=bn, backend="torch")
    kind = torch.where(vis, 2, 1) * mask
    nk = vis.shape[1]
    nt = -(-nk // bn)
    key_has_text = torch.zeros(vis.shape[0], nt * bn, dtype=torch.bool)
    key_has_text[:, :nk] = kind == 1
    key_has_text = key_has_text.view(vis.shape[0], nt, bn).any(-1)
    vis_only = query_tile_kinds(vis, mask, nk, bm)
    live = s.live_mask()
    assert vis_only.any()
    for b, m in vis_only.nonzero().tolist():
        diag = torch.zeros(nt, dtype=torch.bool)
        diag[m * bm // bn : -(-min((m + 1) * bm, nk) // bn)] = True
        assert not (live[b, m] & ~(key_has_text[b] | diag)).any()
    dense = plan_schedule(vis, mask, policy="dense", block_m=bm, block_n=bn, backend="torch")
    assert int(s.live_pairs()) <= int(dense.live_pairs())
    if bm == bn == 16:  # fine tiles fit inside the 120-token image, so some visual key tile is skipped
        assert int(s.live_pairs()) < int(dense.live_pairs())


@pytest.mark.parametrize("blocks", BLOCKS)
def test_frozen_visual_tiles_get_no_work(blocks):
    vis, mask = batch()
    bm, bn = blocks
    s = plan_schedule(vis, mask, policy="frozen", block_m=bm, block_n=bn, backend="torch")
    vis_only = query_tile_kinds(vis, mask, vis.shape[1], bm)
    assert vis_only.any()
    assert (s.full_cnt[vis_only] == 0).all() and (s.part_cnt[vis_only] == 0).all()


def test_padding_only_query_tiles_get_no_work():
    vis, mask = batch()
    s = plan_schedule(vis, mask, policy="dense", block_m=16, block_n=16, backend="torch")
    assert (s.full_cnt[1, :2] == 0).all() and (s.part_cnt[1, :2] == 0).all()  # rows 0..31 are padding


def test_schedule_reuse_across_calls():
    vis, mask = batch()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, vis.shape[1], 64, generator=g) for _ in range(3))
    s = plan_schedule(vis, mask, policy="vskip")
    for layer in range(2):
        ql = q + layer
        with_plan = modality_attention(ql, k, v, vis, attention_mask=mask, schedule=s, backend="torch")
        without = modality_attention(ql, k, v, vis, attention_mask=mask, backend="torch")
        assert torch.equal(with_plan, without)


def test_schedule_mismatch_errors():
    vis, mask = batch()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, vis.shape[1], 64, generator=g) for _ in range(3))
    s = plan_schedule(vis, mask, policy="vskip")
    call = lambda **kw: modality_attention(q, k, v, vis, attention_mask=mask, backend="torch", **kw)
    with pytest.raises(ValueError, match="schedule was planned for .*policy='vskip'"):
        call(schedule=s, policy="dense")
    with pytest.raises(ValueError, match="visual_self=True"):
        call(schedule=s, visual_self=False)
    with pytest.raises(ValueError, match="Nq=199"):
        modality_attention(q[:, :, -5:], k, v, vis, attention_mask=mask, schedule=s, backend="torch")
    with pytest.raises(ValueError, match="B=3"):
        modality_attention(q[:2], k[:2], v[:2], vis[:2], attention_mask=mask[:2], schedule=s, backend="torch")
    with pytest.raises(ValueError, match="schedule is on meta"):
        call(schedule=dataclasses.replace(s, kind=s.kind.to("meta")))
    with pytest.raises(TypeError, match="schedule must be a vskip_kernels.Schedule"):
        call(schedule={"policy": "vskip"})


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(nq=0), "nq must be in"),
        (dict(nq=500), "nq must be in"),
        (dict(block_m=48), "block_m must be a power of two"),
        (dict(block_n=8), "block_n must be a power of two"),
        (dict(policy="sparse"), "policy must be one of"),
        (dict(backend="cuda"), "backend must be"),
    ],
)
def test_plan_schedule_errors(kw, match):
    vis, mask = batch()
    with pytest.raises(ValueError, match=match):
        plan_schedule(vis, mask, **kw)
