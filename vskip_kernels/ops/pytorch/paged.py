"""Modality-aware attention on a *paged* KV cache, in PyTorch (the CPU path of the vLLM backend).

Layout (the one vLLM's attention backends hand over, one view per K and V):

* ``q`` [T, Hq, D]: the queries of all requests of a step, packed; request r owns rows
  ``query_start_loc[r] : query_start_loc[r + 1]``, the last of its ``seq_lens[r]`` positions.
* ``k_cache``, ``v_cache`` [num_blocks, Hkv, block_size, D] (any strides): key position p of
  request r lives in block ``block_table[r, p // block_size]``, row ``p % block_size``.
* ``slot_kinds`` int8 [num_blocks * block_size]: the token kind of every cache slot
  (0 pad / unused, 1 text, 2 visual), written when the slot's K/V are written.

The policy rules are those of ``reference.allowed_mask``. The cache is never copied as a
whole: each request walks only the blocks its query rows may see, a few blocks at a time
(``index_select`` of those blocks), with fp32 online softmax. A group of query rows skips
every block holding no key it may attend (for ``vskip``: visual query rows skip blocks of
visual keys, apart from the block holding their own key), and ``frozen`` visual rows and
rows switched off by ``row_live`` are never computed: their output is exact zeros.
"""

from __future__ import annotations

import torch

from ...kinds import KIND_PAD, KIND_TEXT, KIND_VISUAL, POLICIES, policy_allows

_ROW_CHUNK = 256  # query rows per step
_BLOCKS_PER_STEP = 8  # cache blocks per online-softmax step
_NEG_INF = float("-inf")


def check_paged_args(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, slot_kinds, policy):
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, heads, head_dim], got shape {tuple(q.shape)}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or c.shape[3] != q.shape[2]:
            raise ValueError(f"{name} must be [num_blocks, kv_heads, block_size, {q.shape[2]}], got {tuple(c.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    if q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k_cache.shape[1]})")
    if block_table.dim() != 2:
        raise ValueError(f"block_table must be [requests, max_blocks], got shape {tuple(block_table.shape)}")
    r = block_table.shape[0]
    if seq_lens.shape[0] < r or query_start_loc.shape[0] < r + 1:
        raise ValueError(
            f"seq_lens needs {r} entries and query_start_loc {r + 1}, got {seq_lens.shape[0]} and "
            f"{query_start_loc.shape[0]}"
        )
    if (
        slot_kinds.dtype != torch.int8
        or slot_kinds.dim() != 1
        or slot_kinds.numel() < k_cache.shape[0] * k_cache.shape[2]
    ):
        raise ValueError(
            f"slot_kinds must be int8 [num_blocks * block_size >= {k_cache.shape[0] * k_cache.shape[2]}], "
            f"got {slot_kinds.dtype} {tuple(slot_kinds.shape)}"
        )


def paged_attention_torch(
    q,
    k_cache,
    v_cache,
    block_table,
    seq_lens,
    query_start_loc,
    slot_kinds,
    *,
    policy: str = "vskip",
    softmax_scale: float | None = None,
    visual_self: bool = True,
    row_live: torch.Tensor | None = None,
    num_reqs: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of packed queries ``q`` [T, Hq, D] over a paged cache; returns [T, Hq, D] in q's dtype.

    ``row_live`` (bool [T], optional) switches query rows off (output zeros) on top of the
    policy. ``num_reqs`` limits the requests read from ``block_table`` (default: all rows).
    Rows beyond ``query_start_loc[num_reqs]`` (padding) are left as zeros.
    """
    check_paged_args(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, slot_kinds, policy)
    nreq = block_table.shape[0] if num_reqs is None else int(num_reqs)
    hq, d = q.shape[1], q.shape[2]
    hkv, bs = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    scale = float(softmax_scale) if softmax_scale is not None else d**-0.5
    if out is None:
        out = torch.zeros_like(q)
    else:
        out.zero_()
    kinds_by_block = slot_kinds[: k_cache.shape[0] * bs].view(-1, bs)
    qsl = query_start_loc[: nreq + 1].tolist()
    lens = seq_lens[:nreq].tolist()
    for r in range(nreq):
        t0, t1 = qsl[r], qsl[r + 1]
        n, L = t1 - t0, lens[r]
        if n == 0:
            continue
        if n > L:
            raise ValueError(f"request {r} has {n} query rows but only {L} positions (seq_lens)")
        nblk = -(-L // bs)
        blocks = block_table[r, :nblk].long()
        kk = kinds_by_block.index_select(0, blocks).reshape(-1)[:L]
        _one_request(
            q,
            out,
            t0,
            L - n,
            n,
            L,
            blocks,
            kk,
            k_cache,
            v_cache,
            bs,
            hkv,
            g,
            scale,
            policy,
            visual_self,
            None if row_live is None else row_live[t0:t1],
        )
    return out


def _one_request(q, out, t0, p0, n, L, blocks, kk, k_cache, v_cache, bs, hkv, g, scale, policy, visual_self, live_mask):
    dev = q.device
    d = q.shape[2]
    qk = kk[p0:L]
    q_vis = qk == KIND_VISUAL
    live = qk != KIND_PAD
    if policy == "frozen":
        live = live & ~q_vis
    if live_mask is not None:
        live = live & live_mask.to(dev).bool()
    rows = torch.nonzero(live).flatten()
    if rows.numel() == 0:
        return
    nblk = blocks.shape[0]
    pad_to = nblk * bs
    kk_pad = torch.zeros(pad_to, dtype=kk.dtype, device=dev)
    kk_pad[:L] = kk
    kb = kk_pad.view(nblk, bs)
    blk_has_real = (kb != KIND_PAD).any(1)
    blk_has_text = (kb == KIND_TEXT).any(1)
    blk_start = torch.arange(nblk, device=dev) * bs
    row_list = rows.tolist()
    for c0 in range(0, len(row_list), _ROW_CHUNK):
        r_idx = rows[c0 : c0 + _ROW_CHUNK]
        c = r_idx.numel()
        qpos = r_idx + p0  # key position of each row
        rkind = qk.index_select(0, r_idx)
        rvis = rkind == KIND_VISUAL
        hi = int(qpos.max())
        # Blocks this row group may see at all: start at or before its last row, hold a real key, and
        # under vskip either hold a text key, or serve a text row, or hold one of its visual rows' own keys.
        live_blk = (blk_start <= hi) & blk_has_real
        if policy == "vskip":
            need = blk_has_text.clone()
            if bool((~rvis).any()):
                need[:] = True
            elif visual_self:
                need[torch.div(qpos[rvis], bs, rounding_mode="floor").unique()] = True
            live_blk = live_blk & need
        live_ids = torch.nonzero(live_blk).flatten()
        if live_ids.numel() == 0:
            continue
        qc = q[t0 + r_idx].float().mul_(scale)  # [c, Hq, D]
        q2 = qc.view(c, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * c, d)
        m = q2.new_full((hkv, g * c), _NEG_INF)
        l = q2.new_zeros((hkv, g * c))
        acc = q2.new_zeros((hkv, g * c, d))
        for j0 in range(0, live_ids.numel(), _BLOCKS_PER_STEP):
            ids = live_ids[j0 : j0 + _BLOCKS_PER_STEP]
            phys = blocks.index_select(0, ids)
            kpos = (ids[:, None] * bs + torch.arange(bs, device=dev)[None, :]).reshape(-1)
            kkind = kb.index_select(0, ids).reshape(-1)
            allowed = policy_allows(rkind[:, None], kkind[None, :], qpos[:, None], kpos[None, :], policy, visual_self)
            kc = k_cache.index_select(0, phys).permute(1, 0, 2, 3).reshape(hkv, -1, d).float()
            vc = v_cache.index_select(0, phys).permute(1, 0, 2, 3).reshape(hkv, -1, d).float()
            s = torch.matmul(q2, kc.transpose(1, 2))  # [Hkv, G*c, keys]
            s.view(hkv, g, c, -1).masked_fill_(~allowed[None, None], _NEG_INF)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(m_new == _NEG_INF, 0.0, m_new)
            alpha = torch.exp(m - m_safe)
            p = torch.exp(s - m_safe[..., None])
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + torch.matmul(p, vc)
            m = m_new
        empty = m == _NEG_INF
        o = torch.where(empty[..., None], 0.0, acc / torch.where(empty, 1.0, l)[..., None])
        o = o.view(hkv, g, c, d).permute(2, 0, 1, 3).reshape(c, hkv * g, d)
        out.index_copy_(0, t0 + r_idx, o.to(out.dtype))
