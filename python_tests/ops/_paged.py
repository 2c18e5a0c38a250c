"""Paged-cache layouts for the paged kernel tests: scatter per-request K/V into a shuffled
block pool, and the per-request reference on the contiguous originals."""

from __future__ import annotations

import torch

from vskip_kernels.reference import attention_ref, token_kind


def make_case(reqs, *, hq=4, hkv=2, d=32, bs=16, dtype=torch.float32, seed=0, spare_blocks=3):
    """reqs: list of (seq_len, q_len, visual ranges [(a, b), ...]).

    Returns dict with q [T, Hq, D], k_cache/v_cache [NB, Hkv, bs, D], block_table, seq_lens,
    query_start_loc, slot_kinds, and per request the contiguous (q, k, v, is_visual) for the reference.
    Blocks are handed out in a shuffled order, with unused blocks filled with garbage (and visual
    kinds) that must never be read.
    """
    g = torch.Generator().manual_seed(seed)
    nblks = [-(-L // bs) for L, _, _ in reqs]
    nb = sum(nblks) + spare_blocks
    perm = torch.randperm(nb, generator=g)
    k_cache = (torch.randn(nb, hkv, bs, d, generator=g) * 50).to(dtype)  # garbage: huge values
    v_cache = (torch.randn(nb, hkv, bs, d, generator=g) * 50).to(dtype)
    slot_kinds = torch.full((nb * bs,), 2, dtype=torch.int8)
    maxb = max(nblks)
    block_table = torch.zeros(len(reqs), maxb, dtype=torch.int32)
    qs, per_req, cu = [], [], [0]
    used = 0
    for r, (L, n, ranges) in enumerate(reqs):
        ids = perm[used : used + nblks[r]]
        used += nblks[r]
        block_table[r, : nblks[r]] = ids.int()
        k = torch.randn(1, hkv, L, d, generator=g).to(dtype)
        v = torch.randn(1, hkv, L, d, generator=g).to(dtype)
        q = torch.randn(1, hq, n, d, generator=g).to(dtype)
        vis = torch.zeros(1, L, dtype=torch.bool)
        for a, b in ranges:
            vis[0, a:b] = True
        kind = token_kind(vis)[0]
        for p in range(L):
            blk, off = int(ids[p // bs]), p % bs
            k_cache[blk, :, off] = k[0, :, p]
            v_cache[blk, :, off] = v[0, :, p]
            slot_kinds[blk * bs + off] = kind[p]
        qs.append(q[0].transpose(0, 1))
        cu.append(cu[-1] + n)
        per_req.append((q, k, v, vis))
    return dict(
        q=torch.cat(qs, 0).contiguous(),
        k_cache=k_cache,
        v_cache=v_cache,
        block_table=block_table,
        seq_lens=torch.tensor([L for L, _, _ in reqs], dtype=torch.int32),
        query_start_loc=torch.tensor(cu, dtype=torch.int32),
        slot_kinds=slot_kinds,
        per_req=per_req,
    )


PAGED_ARGS = ("q", "k_cache", "v_cache", "block_table", "seq_lens", "query_start_loc", "slot_kinds")


def paged_args(case) -> tuple:
    """The positional arguments of the paged kernels (torch and Triton) for ``case``."""
    return tuple(case[name] for name in PAGED_ARGS)


def reference(case, policy, visual_self=True, upcast=True):
    outs = []
    for q, k, v, vis in case["per_req"]:
        o, _, _ = attention_ref(q, k, v, vis, policy=policy, visual_self=visual_self, upcast=upcast)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, 0)


# (seq_len, q_len, visual ranges): prefill, chunked prefill continuing after an image,
# one-token prefill, decode rows, an image split across the chunk boundary, text only.
MIXED = [
    (70, 70, [(5, 50)]),
    (90, 25, [(30, 80)]),
    (41, 1, [(3, 35)]),
    (100, 1, [(10, 60)]),
    (64, 64, []),
    (50, 12, [(20, 45)]),
]

# Decode steps (one query token each, one two-token step), after images of several blocks.
DECODE = [
    (70, 1, [(5, 50)]),
    (41, 1, [(3, 35)]),
    (100, 2, [(10, 60)]),
    (17, 1, []),
]
