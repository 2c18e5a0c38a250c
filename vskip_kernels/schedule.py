"""Tile schedule: which key tiles each (sequence, query tile) visits.

Planned once per forward from the modality and padding masks and reused by
every layer of the same policy (FlexAttention's BlockMask, FlashInfer's plan).
For each (b, query tile m) it lists the *full* key tiles (every entry allowed,
so the kernel skips the mask) and the *partial* ones (at least one allowed
entry, masked in-kernel). A tile pair with no allowed entry is in neither list
and is never loaded.

Everything is computed from per-tile aggregates with prefix sums, so planning
costs O(B * (N + tiles_m * tiles_n)) and never builds an N x N mask. It uses no
host synchronisation, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .kinds import KIND_PAD, KIND_TEXT, KIND_VISUAL, POLICY_CODES, token_kind

_BIG = 1 << 30


# The ops layer tells the planner which tile shape its kernels use for a query tensor
# (set_tile_shape_provider, called when vskip_kernels.ops is imported), so the planner
# never imports the kernels above it.
_tile_shape_for: Callable[[torch.Tensor], tuple[int, int]] | None = None


def set_tile_shape_provider(fn: Callable[[torch.Tensor], tuple[int, int]]) -> None:
    global _tile_shape_for
    _tile_shape_for = fn


@dataclass(frozen=True)
class Schedule:
    """A tile schedule. Tensors live on the device of the mask it was planned from.

    kind      [B, Nk] int8   0 = padding, 1 = text, 2 = visual (what the kernels read)
    full_cnt  [B, Mt] int32  number of full key tiles of query tile m
    full_idx  [B, Mt, Nt] int32  their indices, ascending, first full_cnt valid
    part_cnt  [B, Mt] int32  number of partial key tiles
    part_idx  [B, Mt, Nt] int32
    """

    kind: torch.Tensor
    full_cnt: torch.Tensor
    full_idx: torch.Tensor
    part_cnt: torch.Tensor
    part_idx: torch.Tensor
    nq: int
    nk: int
    policy: str
    visual_self: bool
    block_m: int
    block_n: int

    @property
    def num_m_tiles(self) -> int:
        return self.full_cnt.shape[1]

    @property
    def num_n_tiles(self) -> int:
        return self.full_idx.shape[2]

    def live_pairs(self) -> torch.Tensor:
        """Number of (sequence, query tile, key tile) pairs the kernels visit (per head)."""
        return self.full_cnt.sum() + self.part_cnt.sum()

    def live_mask(self) -> torch.Tensor:
        """[B, Mt, Nt] bool of visited tile pairs (for tests and diagnostics)."""
        return self._mask(self.full_cnt, self.full_idx) | self._mask(self.part_cnt, self.part_idx)

    def full_mask(self) -> torch.Tensor:
        return self._mask(self.full_cnt, self.full_idx)

    @staticmethod
    def _mask(cnt: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        nt = idx.shape[2]
        valid = torch.arange(nt, device=idx.device)[None, None, :] < cnt[..., None]
        out = torch.zeros(idx.shape, dtype=torch.bool, device=idx.device)
        return out.scatter_(2, idx.long().clamp_(0, nt - 1), valid) if nt else out

    def matches(self, nq: int, nk: int, policy: str, visual_self: bool) -> bool:
        return (self.nq, self.nk, self.policy) == (nq, nk, policy) and (
            policy != "vskip" or self.visual_self == visual_self
        )

    @property
    def device(self) -> torch.device:
        return self.kind.device

    @property
    def batch_size(self) -> int:
        return self.kind.shape[0]

    def to(self, device) -> Schedule:
        """The same schedule with its tensors on ``device`` (a no-op when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        move = lambda t: t.to(device, non_blocking=True)
        return dataclasses.replace(
            self,
            kind=move(self.kind),
            full_cnt=move(self.full_cnt),
            full_idx=move(self.full_idx),
            part_cnt=move(self.part_cnt),
            part_idx=move(self.part_idx),
        )

    def live_tile_fraction(self) -> float:
        """Share of all (sequence, query tile, key tile) pairs the kernels visit (reads the device)."""
        total = self.batch_size * self.num_m_tiles * self.num_n_tiles
        return float(self.live_pairs()) / total if total else 0.0

    def __repr__(self) -> str:
        total = self.batch_size * self.num_m_tiles * self.num_n_tiles
        full, part = int(self.full_cnt.sum()), int(self.part_cnt.sum())
        pct = lambda x: 100.0 * x / total if total else 0.0
        vs = f", visual_self={self.visual_self}" if self.policy == "vskip" else ""
        return (
            f"Schedule(policy={self.policy!r}{vs}, B={self.batch_size}, nq={self.nq}, nk={self.nk}, "
            f"block=({self.block_m}, {self.block_n}), tiles={self.num_m_tiles}x{self.num_n_tiles}, "
            f"live={pct(full + part):.2f}% (full {pct(full):.2f}%, partial {pct(part):.2f}%), "
            f"device={self.device})"
        )

    def to_block_mask(self):
        """The equivalent FlexAttention ``BlockMask``: our full tiles are its full blocks, our
        partial tiles its masked blocks (with ``vskip_kernels.flex``'s mask_mod), BLOCK_SIZE
        (block_m, block_n). Built from the tile lists, without evaluating the mask."""
        from torch.nn.attention.flex_attention import BlockMask

        from .flex import mask_mod_from_kind

        mod = mask_mod_from_kind(self.kind, self.policy, nq=self.nq, visual_self=self.visual_self)
        return BlockMask.from_kv_blocks(
            self.part_cnt[:, None].contiguous(),
            self.part_idx[:, None].contiguous(),
            self.full_cnt[:, None].contiguous(),
            self.full_idx[:, None].contiguous(),
            BLOCK_SIZE=(self.block_m, self.block_n),
            mask_mod=mod,
            seq_lengths=(self.nq, self.nk),
        )


def classify_tiles(kind: torch.Tensor, nq: int, policy: str, visual_self: bool, block_m: int, block_n: int):
    """(live, full) bool [B, Mt, Nt], pure PyTorch. The native op mirrors this exactly."""
    b, nk = kind.shape
    dev = kind.device
    off = nk - nq
    mt, nt = -(-nq // block_m), -(-nk // block_n)
    kind = kind.to(torch.int8)

    # --- key tiles: first real / first text position, "all real" / "all text"
    kpad = torch.full((b, nt * block_n), KIND_PAD, dtype=torch.int8, device=dev)
    kpad[:, :nk] = kind
    kt = kpad.view(b, nt, block_n)
    pos = torch.arange(nt * block_n, device=dev).view(1, nt, block_n)
    big = torch.full_like(pos, _BIG)
    first_real = torch.where(kt != KIND_PAD, pos, big).amin(-1)  # [B, Nt]
    first_text = torch.where(kt == KIND_TEXT, pos, big).amin(-1)
    all_real = (kt != KIND_PAD).all(-1)
    all_text = (kt == KIND_TEXT).all(-1)
    last_pos = (torch.arange(nt, device=dev) + 1) * block_n - 1  # [Nt]

    # --- query rows: unrestricted (attend to all earlier keys), restricted (vskip visual)
    qk = torch.full((b, mt * block_m), KIND_PAD, dtype=torch.int8, device=dev)
    qk[:, :nq] = kind[:, off:]
    qpos = (torch.arange(mt * block_m, device=dev) + off).view(1, mt * block_m)
    is_vis = qk == KIND_VISUAL
    unrestricted = (qk == KIND_TEXT) | (is_vis & (policy == "dense"))
    restricted = is_vis & (policy == "vskip")
    neg = torch.full_like(qpos, -1).expand(b, -1)
    posb = qpos.expand(b, -1)
    max_u = torch.where(unrestricted, posb, neg).view(b, mt, block_m).amax(-1)  # [B, Mt]
    max_r = torch.where(restricted, posb, neg).view(b, mt, block_m).amax(-1)
    min_all = torch.where(unrestricted | restricted, posb, torch.full_like(posb, _BIG)).view(b, mt, block_m).amin(-1)
    rows_all_live = (unrestricted | restricted).view(b, mt, block_m).all(-1)
    has_r = restricted.view(b, mt, block_m).any(-1)

    live = max_u[:, :, None] >= first_real[:, None, :]
    live |= max_r[:, :, None] >= first_text[:, None, :]
    if policy == "vskip" and visual_self:
        # a restricted row whose own position falls in key tile n sees itself there
        csum = torch.zeros(b, mt * block_m + 1, dtype=torch.int32, device=dev)
        csum[:, 1:] = restricted.int().cumsum(1)
        m_lo = (torch.arange(mt, device=dev) * block_m)[:, None]
        n_lo = (torch.arange(nt, device=dev) * block_n)[None, :] - off
        lo = torch.maximum(m_lo, n_lo).clamp(0, mt * block_m)
        hi = torch.minimum(m_lo + block_m, n_lo + block_n).clamp(0, mt * block_m)
        hi = torch.maximum(hi, lo)
        cnt = csum.gather(1, hi.reshape(1, -1).expand(b, -1)) - csum.gather(1, lo.reshape(1, -1).expand(b, -1))
        live |= cnt.view(b, mt, nt) > 0

    full = (
        rows_all_live[:, :, None]
        & all_real[:, None, :]
        & (last_pos[None, None, :] <= min_all[:, :, None])
        & (~has_r[:, :, None] | all_text[:, None, :])
    )
    return live, full & live


def _to_lists(flag: torch.Tensor):
    cnt = flag.sum(-1, dtype=torch.int32)
    # stable descending sort puts the flagged tiles first, in ascending tile order
    idx = torch.sort(flag.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
    return cnt, idx.contiguous()


def plan_schedule(
    is_visual: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    nq: int | None = None,
    policy: str = "vskip",
    visual_self: bool = True,
    block_m: int | None = None,
    block_n: int | None = None,
    like: torch.Tensor | None = None,
    backend: str = "auto",
) -> Schedule:
    """Plan the tile schedule for queries that are the last ``nq`` of ``Nk`` positions.

    like: a query tensor [B, Hq, Nq, D] of the calls the schedule is for; the tile shape is
    then the one ``modality_attention`` uses for that device, dtype and head dim (on sm80 and
    sm90 that is not the 64x64 default). block_m / block_n override it; without either, 64.
    backend: "native" (the compiled ``vskip::plan_schedule`` op), "torch", or "auto"
    (native when the extension is built, else torch).
    """
    from ._validate import check_mask_inputs

    check_mask_inputs(is_visual, attention_mask, policy)
    if like is not None:
        if not isinstance(like, torch.Tensor) or like.dim() != 4:
            raise ValueError(f"like must be a query tensor [B, Hq, Nq, D], got {tuple(getattr(like, 'shape', ()))}")
        if _tile_shape_for is None:
            raise RuntimeError("internal error: no tile-shape provider (vskip_kernels.ops registers it on import)")
        kernel_m, kernel_n = _tile_shape_for(like)
        block_m = kernel_m if block_m is None else block_m
        block_n = kernel_n if block_n is None else block_n
        if nq is None:
            nq = like.shape[2]
    block_m = 64 if block_m is None else block_m
    block_n = 64 if block_n is None else block_n
    nk = is_visual.shape[1]
    nq = nk if nq is None else int(nq)
    if not 0 < nq <= nk:
        raise ValueError(f"nq must be in [1, Nk={nk}], got {nq}")
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {blk}")
    kind = token_kind(is_visual, attention_mask).contiguous()

    from . import _native

    native = _native.get_op("plan_schedule") if backend in ("auto", "native") else None
    if backend == "native" and native is None:
        raise RuntimeError("backend='native' but the vskip_kernels._C extension is not built")
    if backend not in ("auto", "native", "torch"):
        raise ValueError(f"backend must be 'auto', 'native' or 'torch', got {backend!r}")
    if native is not None:
        full_cnt, full_idx, part_cnt, part_idx = native(
            kind, nq, POLICY_CODES[policy], bool(visual_self), block_m, block_n
        )
    else:
        live, full = classify_tiles(kind, nq, policy, visual_self, block_m, block_n)
        full_cnt, full_idx = _to_lists(full)
        part_cnt, part_idx = _to_lists(live & ~full)
    return Schedule(kind, full_cnt, full_idx, part_cnt, part_idx, nq, nk, policy, bool(visual_self), block_m, block_n)
