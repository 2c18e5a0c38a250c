"""Pure-PyTorch backend: the CPU path and the CUDA fallback (fp32, odd head dims).

Small problems (every sequence's full score matrix within ``_SMALL_BUDGET`` fp32
elements) run as one masked softmax over the batch: at a few hundred tokens
per sequence, per-row-set work is all Python overhead and there is nothing to save.
Larger ones: tiled online softmax in fp32, per sequence. Rows are split by what they
may see so the savings are real rather than masked away:

* unrestricted rows (text queries; visual queries under ``dense``) attend every
  real key at or before them;
* ``vskip`` visual rows attend only the gathered text keys (plus their own key,
  merged in as one extra column), so their cost is O(text), not O(N);
* ``frozen`` visual rows and padding rows are never computed.

Within a row set, a query chunk only visits key chunks that start at or before
its last position, and masks only the chunks that reach past its first
position. Peak extra memory is a few [Hq, chunk, key_chunk] fp32 blocks plus
O(N * D) gathers — never N x N.

Non-finite inputs: a NaN/inf in q affects only that query row; in k at key j,
only rows that attend j (masked scores are overwritten with -inf); in v at key j,
every row attending j and possibly other rows of the same query chunk (0 * NaN
in the tile's P @ V, as in any tiled kernel). Results are deterministic run to run.
"""

from __future__ import annotations

import bisect

import torch

from ...kinds import KIND_PAD, KIND_TEXT, KIND_VISUAL, policy_allows

_KEY_CHUNK = 512
_SCORE_BUDGET = 1 << 22  # fp32 score elements per step: bounds the working set to ~16 MiB per temporary
_MAX_ROW_CHUNK = 1024
# Problems this small (every sequence's full score matrix within _SCORE_BUDGET) run as one
# masked batch instead of per-sequence row sets: at a few hundred tokens the row-set path
# is all Python and launch overhead (seven times slower than the model's eager attention
# on the demo's 80-token prompts), and there is nothing worth skipping.
_SMALL_BUDGET = _SCORE_BUDGET
_NEG_INF = float("-inf")


class _Keys:
    """A key set of one sequence: its K/V rows, ascending positions, and which are visual."""

    def __init__(self, k, v, kind_b, idx):
        if idx is None:  # every position: slice the originals instead of copying
            self.k, self.v = k, v
            self.pos = torch.arange(k.shape[1], device=k.device)
            self.vis = kind_b == KIND_VISUAL
        else:
            self.k = k.index_select(1, idx)
            self.v = None if v is None else v.index_select(1, idx)
            self.pos = idx
            self.vis = kind_b.index_select(0, idx) == KIND_VISUAL
        self.pos_list = self.pos.tolist()
        # one P @ [1, is_visual] product yields both the row sum and the visual sum
        self.sum_cols = torch.stack([torch.ones_like(self.vis, dtype=torch.float32), self.vis.float()], 1)


def _row_chunk(hq: int) -> int:
    return max(1, min(_MAX_ROW_CHUNK, _SCORE_BUDGET // (hq * _KEY_CHUNK)))


def _chunks(pos_list, step):
    """Row chunks of at most step rows, also cut at position gaps wider than a key chunk: a chunk
    holding rows far apart would make its early rows scan (masked) keys only its late rows need."""
    start = 0
    for i in range(1, len(pos_list) + 1):
        if i == len(pos_list) or i - start == step or pos_list[i] - pos_list[i - 1] > _KEY_CHUNK:
            yield start, i
            start = i


def _attend_chunk(qc, pc, lo, hi, keys, want_out, self_kv):
    """Online softmax of one query chunk. qc fp32 [Hkv, G, C, D], pre-scaled; pc long [C] positions in [lo, hi].

    Returns (acc [Hkv, G*C, D] | None, m, l, lv) with m/l/lv [Hkv, G*C].
    self_kv: (k_self [Hkv, C, D], v_self [Hkv, C, D] | None) merged as one extra visual key per row.
    """
    hkv, g, c, d = qc.shape
    q2 = qc.reshape(hkv, g * c, d)
    m = q2.new_full((hkv, g * c), _NEG_INF)
    l = q2.new_zeros((hkv, g * c))
    lv = q2.new_zeros((hkv, g * c))
    acc = q2.new_zeros((hkv, g * c, d)) if want_out else None
    n_live = bisect.bisect_right(keys.pos_list, hi)
    n_unmasked = bisect.bisect_right(keys.pos_list, lo)
    for j0 in range(0, n_live, _KEY_CHUNK):
        j1 = min(j0 + _KEY_CHUNK, n_live)
        kc = keys.k[:, j0:j1].float()
        s = torch.matmul(q2, kc.transpose(1, 2))
        if j1 > n_unmasked:
            allow = keys.pos[j0:j1][None, :] <= pc[:, None]
            s.view(hkv, g, c, j1 - j0).masked_fill_(~allow, _NEG_INF)
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = torch.where(m_new == _NEG_INF, 0.0, m_new)  # fully masked rows stay 0, not NaN
        alpha = torch.exp(m - m_safe)
        p = s.sub_(m_safe[..., None]).exp_()
        sums = torch.matmul(p, keys.sum_cols[j0:j1])
        l = l * alpha + sums[..., 0]
        lv = lv * alpha + sums[..., 1]
        if want_out:
            acc = acc * alpha[..., None] + torch.matmul(p, keys.v[:, j0:j1].float())
        m = m_new
    if self_kv is not None:
        ks, vs = self_kv
        s_self = (qc * ks.float()[:, None]).sum(-1).reshape(hkv, g * c)
        m_new = torch.maximum(m, s_self)
        alpha = torch.exp(m - m_new)
        ps = torch.exp(s_self - m_new)
        l = l * alpha + ps
        lv = lv * alpha + ps
        if want_out:
            vs = vs.float()[:, None].expand(hkv, g, c, d).reshape(hkv, g * c, d)
            acc = acc * alpha[..., None] + ps[..., None] * vs
        m = m_new
    return acc, m, l, lv


def _run_rows(b, q, k, v, rows, qpos, keys, scale, results, want_out, with_self):
    """Computes the given query rows of sequence b against one key set and writes them into results."""
    out, mass, lse = results
    hq, d = q.shape[1], q.shape[3]
    hkv = k.shape[1]
    g = hq // hkv
    pos = qpos.index_select(0, rows)
    order = torch.argsort(pos, stable=True)
    rows, pos = rows.index_select(0, order), pos.index_select(0, order)
    pos_list = pos.tolist()
    for c0, c1 in _chunks(pos_list, _row_chunk(hq)):
        r, pc = rows[c0:c1], pos[c0:c1]
        c = c1 - c0
        qc = q[b].index_select(1, r).float().mul_(scale).view(hkv, g, c, d)
        self_kv = None
        if with_self:
            self_kv = (k[b].index_select(1, pc), v[b].index_select(1, pc) if want_out else None)
        acc, m, l, lv = _attend_chunk(qc, pc, pos_list[c0], pos_list[c1 - 1], keys, want_out, self_kv)
        empty = m == _NEG_INF  # no allowed key; NaN rows are not "empty" and keep their NaN
        safe_l = torch.where(empty, 1.0, l)
        if mass is not None:
            mass[b].index_copy_(1, r, torch.where(empty, 0.0, lv / safe_l).view(hq, c))
        if lse is not None:
            lse[b].index_copy_(1, r, torch.where(empty, _NEG_INF, m + torch.log(safe_l)).view(hq, c))
        if want_out:
            o = torch.where(empty[..., None], 0.0, acc / safe_l[..., None])
            out[b].index_copy_(1, r, o.view(hq, c, d).to(out.dtype))


def allowed_rows(kind, qpos, policy, visual_self):
    """bool [B, S, Nk]: may the query at qpos[s] of sequence b attend key j."""
    keys = torch.arange(kind.shape[1], device=kind.device)
    return policy_allows(
        kind.index_select(1, qpos)[:, :, None], kind[:, None, :], qpos[:, None], keys[None, :], policy, visual_self
    )


def _forward_small(q, k, v, kind, qpos, policy, visual_self, scale, want_out, want_mass, want_lse):
    """The whole batch as one masked softmax (small problems)."""
    bsz, hq, s_len, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    allowed = allowed_rows(kind, qpos, policy, visual_self)[:, None, None]  # [B, 1, 1, S, Nk]
    qf = (q.float() * scale).view(bsz, hkv, g, s_len, d)  # not in place: q.float() may be q
    s = torch.matmul(qf, k.float()[:, :, None].transpose(-1, -2)).masked_fill_(~allowed, _NEG_INF)
    m = s.amax(-1)
    empty = m == _NEG_INF  # no allowed key; NaN rows are not "empty" and keep their NaN
    m_safe = torch.where(empty, 0.0, m)
    p = s.sub_(m_safe[..., None]).exp_()
    # one P @ [1, is_visual] product gives the row sum and the visual sum (mass <= 1 exactly
    # when every allowed key is visual, as in the row-set path)
    vis = (kind == KIND_VISUAL).float()
    sums = torch.matmul(p, torch.stack([torch.ones_like(vis), vis], -1)[:, None, None])
    l, lv = sums[..., 0], sums[..., 1]
    safe_l = torch.where(empty, 1.0, l)
    out = mass = lse = None
    if want_out:
        vf = v.float()[:, :, None]
        finite = torch.isfinite(vf)
        if bool(finite.all()):
            o = torch.matmul(p, vf)
        else:
            # masked probabilities are exact zeros, but 0 * inf is NaN: multiply by finite
            # values, then poison exactly the (row, dim) pairs that attend a non-finite value
            o = torch.matmul(p, torch.where(finite, vf, 0.0))
            hit = torch.matmul(allowed.float(), (~finite).float()) > 0
            o = torch.where(hit, torch.matmul(p, vf), o)
        o = o / safe_l[..., None]
        out = torch.empty_like(q)  # q's strides, as the fake impl (empty_like) promises
        out.copy_(torch.where(empty[..., None], 0.0, o).view(bsz, hq, s_len, d))
    if want_mass:
        mass = torch.where(empty, 0.0, lv / safe_l).view(bsz, hq, s_len)
    if want_lse:
        lse = torch.where(empty, _NEG_INF, m_safe + torch.log(safe_l)).view(bsz, hq, s_len)
    return out, mass, lse


def _forward(q, k, v, kind, qpos, policy, visual_self, scale, want_out, want_mass, want_lse):
    """Shared driver. q [B, Hq, S, D] are queries at key positions qpos (long [S], any order)."""
    bsz, hq, s_len, d = q.shape
    if bsz * hq * s_len * k.shape[2] <= _SMALL_BUDGET:
        return _forward_small(
            q,
            k,
            v,
            kind.to(device=q.device, dtype=torch.int8),
            qpos,
            policy,
            visual_self,
            scale,
            want_out,
            want_mass,
            want_lse,
        )
    dev = q.device
    out = torch.zeros_like(q) if want_out else None  # q's strides, as the fake impl (empty_like) promises
    mass = torch.zeros(bsz, hq, s_len, dtype=torch.float32, device=dev) if want_mass else None
    lse = torch.full((bsz, hq, s_len), _NEG_INF, dtype=torch.float32, device=dev) if want_lse else None
    results = (out, mass, lse)
    kind = kind.to(device=dev, dtype=torch.int8)
    for b in range(bsz):
        kb = kind[b]
        qk = kb.index_select(0, qpos)
        q_vis = qk == KIND_VISUAL
        unrestricted = (qk == KIND_TEXT) | (q_vis if policy == "dense" else torch.zeros_like(q_vis))
        rows = torch.nonzero(unrestricted).flatten()
        if rows.numel():
            real_idx = None if bool((kb != KIND_PAD).all()) else torch.nonzero(kb != KIND_PAD).flatten()
            keys = _Keys(k[b], v[b] if want_out else None, kb, real_idx)
            _run_rows(b, q, k, v, rows, qpos, keys, scale, results, want_out, with_self=False)
        if policy == "vskip":
            rows = torch.nonzero(q_vis).flatten()
            if rows.numel():
                keys = _Keys(k[b], v[b] if want_out else None, kb, torch.nonzero(kb == KIND_TEXT).flatten())
                _run_rows(b, q, k, v, rows, qpos, keys, scale, results, want_out, with_self=visual_self)
    return results


def attention_forward(q, k, v, kind, policy: str, visual_self: bool, scale: float, want_mass: bool, want_lse: bool):
    """Modality-aware causal attention; returns (out in q's dtype, mass fp32 | None, lse fp32 | None).

    q [B, Hq, Nq, D] are the last Nq of the Nk positions of k, v [B, Hkv, Nk, D];
    kind int8 [B, Nk] (0 pad, 1 text, 2 visual). Rows with no allowed key give
    out 0, mass 0, lse -inf.
    """
    nq, nk = q.shape[2], k.shape[2]
    qpos = torch.arange(nk - nq, nk, device=q.device)
    return _forward(q, k, v, kind, qpos, policy, bool(visual_self), float(scale), True, want_mass, want_lse)


def visual_mass(q, k, kind, q_pos, policy: str, visual_self: bool, scale: float) -> torch.Tensor:
    """fp32 [B, Hq, S]: visual share of the softmax of queries q [B, Hq, S, D] at key positions q_pos [S]."""
    qpos = q_pos.to(device=q.device, dtype=torch.long)
    _, mass, _ = _forward(q, k, None, kind, qpos, policy, bool(visual_self), float(scale), False, True, False)
    return mass
