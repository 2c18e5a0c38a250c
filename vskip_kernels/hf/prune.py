"""Visual-token pruning inside a patched transformers decoder (FastV, VTW, PyramidDrop).

A plan's prune stages cut the decoder into segments: layers before the first stage see the
whole sequence, layers from stage i on see only the tokens every stage up to i kept. A
segment's layers run on a compacted sequence: on the prompt call the stage layer gathers
the kept rows of the hidden states, and the segment's position embeddings and 2-D padding
mask are gathered with them, so kept tokens keep their positions (RoPE, M-RoPE) and the
segment's KV cache holds only kept tokens. Sequences of a batch keep different numbers of
tokens; each segment re-forms left padding (kept rows right-aligned, padding slots masked).

Ranking: layer K-1's attention (our kernel, with the policy the layer runs) returns its
LSE, and ``received_attention`` turns it into the head-averaged probability every key
receives from the last prompt token or from every prompt query: one pass, no N x N matrix.

The model's own loop is untouched. After the last decoder layer, the compacted rows are
scattered back into the full-length sequence so the final norm, the head and
``logits_to_keep`` see the shape the model was called with; a dropped position carries the
hidden state it had when it was dropped (it left the model there).

Calls on a non-empty cache (decode steps, continuations) append their positions to every
segment unpruned: a prompt is ranked once, on its first call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import compat


@dataclass
class _Segment:
    history: torch.Tensor  # [B, Ls] bool: visual flags of the positions this segment's caches hold
    mask: torch.Tensor | None  # [B, Ls] bool padding mask, None when no slot is padding
    offset: int  # full (padded) length minus this segment's (padded) length; constant after the prompt
    orig: torch.Tensor  # [B, n] int64: for each row of the prompt call, its row in the full call
    real: torch.Tensor  # [B, n] bool: rows that hold a token (False: re-formed left padding)


def _right_aligned(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices [B, M] of the kept positions of each sequence, in order, right-aligned to
    the longest (M = most kept), and which slots are real. Padding slots point at unkept rows."""
    n = keep.shape[1]
    m = int(keep.sum(1).max())
    # Stable ascending sort on the keep flag: unkept rows first, then kept rows, each in order.
    idx = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, n - m :]
    return idx, keep.gather(1, idx)


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, ...] at rows idx [B, M] along dim 1."""
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:]))


def _scatter_rows(full: torch.Tensor, orig: torch.Tensor, real: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """A copy of full [B, N, H] whose rows orig[real] are replaced by h's real rows."""
    b, n, hd = full.shape
    flat = (orig + torch.arange(b, device=orig.device)[:, None] * n)[real]
    return (
        full.reshape(b * n, hd).index_copy(0, flat, h.reshape(-1, hd)[real.reshape(-1)].to(full.dtype)).view(b, n, hd)
    )


def _top_visual(scores: torch.Tensor, candidates: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """[B, N] bool: per row the ``counts[b]`` candidates with the highest score, ties to the lower position."""
    s = scores.float().masked_fill(~candidates, float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    limit = torch.tensor(counts, device=s.device)[:, None]
    return candidates & (rank < limit)


class PruneTracker:
    """Segments of one patched model under its plan's prune stages (no stages: inert)."""

    def __init__(self, plan):
        self.plan = plan
        self.stages = list(plan.prune)
        self.num_layers = plan.num_layers
        self._starts = [s.layer for s in self.stages]
        self.clear()

    def clear(self) -> None:
        self.segments: list[_Segment | None] = [None] * (len(self.stages) + 1)
        self.prompting = False  # the running call is a prompt whose stages compact it
        self._scores: dict[int, torch.Tensor] = {}
        self._carry: torch.Tensor | None = None
        self._call: tuple[torch.Tensor, torch.Tensor] | None = None  # (is_visual, real) of the prompt call
        self._n_visual: list[int] = []
        self._pos_cache: dict[int, dict] = {}  # per segment: gathered position kwargs of the prompt call

    @property
    def active(self) -> bool:
        return bool(self.stages)

    def segment(self, layer: int) -> int:
        """0 for layers before the first stage, i for layers from stage i on."""
        return sum(1 for start in self._starts if start <= layer)  # plain Python: traced by torch.compile

    def _live(self, layer: int) -> _Segment | None:
        s = self.segment(layer)
        return self.segments[s] if s else None

    # -- calls ----------------------------------------------------------------------------
    def begin_call(self, history: torch.Tensor, call_mask: torch.Tensor | None, past: int, n: int) -> None:
        """Before the decoder runs: a prompt (empty cache) resets the segments; any other
        call appends its n positions, unpruned, to every segment."""
        if not self.stages:
            return
        self._scores, self._carry, self._pos_cache = {}, None, {}
        b = history.shape[0]
        if call_mask is not None and tuple(call_mask.shape) != tuple(history.shape):
            raise ValueError(
                f"prune stages need the 2-D padding mask [B, cached + new] = {list(history.shape)}, got "
                f"attention_mask of shape {list(call_mask.shape)}"
            )
        if past == 0:
            self.clear()
            real = call_mask.bool() if call_mask is not None else torch.ones_like(history)
            self._call = (history, real)
            self._n_visual = (history & real).sum(1).tolist()
            self.prompting = True
            return
        self.prompting = False
        if self.segments[1] is None:
            raise ValueError(
                "this call continues a cache whose prompt the patch did not prune (prune stages rank a prompt on its "
                "first call, with an empty cache); start from an empty cache"
            )
        new_vis = history[:, past:]
        new_real = call_mask[:, past:].bool() if call_mask is not None else None
        for seg in self.segments[1:]:
            assert seg is not None
            if seg.history.shape[0] != b:
                if b % seg.history.shape[0]:
                    raise ValueError(f"batch changed from {seg.history.shape[0]} to {b} with a non-empty cache")
                r = b // seg.history.shape[0]
                seg.history = seg.history.repeat_interleave(r, 0)
                seg.mask = None if seg.mask is None else seg.mask.repeat_interleave(r, 0)
            seg.history = torch.cat([seg.history, new_vis.to(seg.history.device)], 1)
            if seg.mask is not None or new_real is not None:
                old = seg.mask if seg.mask is not None else torch.ones_like(seg.history[:, :-n])
                add = new_real if new_real is not None else torch.ones_like(new_vis)
                seg.mask = torch.cat([old, add.to(old.device)], 1)

    def end_call(self) -> None:
        self.prompting = False
        self._scores, self._carry, self._pos_cache, self._call = {}, None, {}, None

    # -- ranking --------------------------------------------------------------------------
    def rank_for(self, layer: int) -> str | None:
        """The rank rule when ``layer``'s attention must score keys for the next layer's stage."""
        if not self.prompting:
            return None
        stage = self.plan.prune_stage_at(layer + 1)
        return stage.rank if stage is not None and stage.keep > 0 else None

    def set_scores(self, layer: int, scores: torch.Tensor) -> None:
        self._scores[layer] = scores

    # -- layers ---------------------------------------------------------------------------
    def visual(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(is_visual, padding mask) of the keys of a compacted layer; None before the first stage."""
        seg = self._live(layer)
        return None if seg is None else (seg.history, seg.mask)

    def enter(self, layer: int, hidden: torch.Tensor, kw: dict) -> tuple[torch.Tensor, dict]:
        """A layer's input and kwargs on its segment: the stage layer compacts a prompt."""
        s = self.segment(layer)
        if s == 0:
            return hidden, kw
        if self.prompting and self._starts[s - 1] == layer:
            hidden = self._compact(s, hidden)
        seg = self.segments[s]
        if seg is None:
            raise RuntimeError(f"internal error: layer {layer} runs before its prune segment was formed")
        if self.prompting:
            cached = self._pos_cache.get(s)
            if cached is None:
                cached = self._pos_cache[s] = compat.gather_position_kwargs(kw, seg.orig)
            kw = {**kw, **cached}
        return hidden, compat.with_layer_mask(kw, seg.mask)

    def leave(self, layer: int, out):
        """The last layer's output, scattered back to the full sequence after a compacted prompt."""
        if not (self.prompting and layer == self.num_layers - 1 and self._carry is not None):
            return out
        seg = self.segments[-1]
        assert seg is not None
        return _scatter_rows(self._carry, seg.orig, seg.real, out)

    def _compact(self, s: int, hidden: torch.Tensor) -> torch.Tensor:
        stage = self.stages[s - 1]
        assert self._call is not None
        if s == 1:
            vis, real = self._call
            orig = torch.arange(vis.shape[1], device=vis.device).expand_as(vis)
            self._carry = hidden
        else:
            prev = self.segments[s - 1]
            assert prev is not None and self._carry is not None
            vis, orig = prev.history, prev.orig
            real = prev.real
            self._carry = _scatter_rows(self._carry, prev.orig, prev.real, hidden)
        vis, real, orig = vis.to(hidden.device), real.to(hidden.device), orig.to(hidden.device)
        candidates = vis & real
        counts = [stage.kept(n) for n in self._n_visual]
        if stage.keep > 0:
            scores = self._scores.pop(stage.layer - 1, None)
            if scores is None:
                raise RuntimeError(
                    f"internal error: layer {stage.layer - 1} did not rank the visual tokens for the stage at "
                    f"layer {stage.layer}"
                )
            kept_vis = _top_visual(scores.to(hidden.device), candidates, counts)
        else:
            kept_vis = torch.zeros_like(candidates)
        keep = (real & ~vis) | kept_vis
        if not bool(keep.any(1).all()):
            raise ValueError(
                f"the prune stage at layer {stage.layer} leaves a sequence with no token (its prompt is all visual "
                "tokens); keep some visual tokens or add text to the prompt"
            )
        idx, slot_real = _right_aligned(keep)
        self.segments[s] = _Segment(
            history=vis.gather(1, idx) & slot_real,
            mask=None if bool(slot_real.all()) else slot_real,
            offset=self._call[0].shape[1] - idx.shape[1],
            orig=orig.gather(1, idx),
            real=slot_real,
        )
        return _gather_rows(hidden, idx)

    # -- cache bookkeeping ------------------------------------------------------------------
    def offset(self, layer: int) -> int:
        """Positions the full sequence has beyond what ``layer``'s cache holds (0 before the first stage)."""
        seg = self._live(layer)
        return 0 if seg is None else seg.offset

    def reorder(self, beam_idx: torch.Tensor) -> None:
        for seg in self.segments[1:]:
            if seg is None:
                continue
            i = beam_idx.to(seg.history.device)
            seg.history = seg.history.index_select(0, i)
            seg.mask = None if seg.mask is None else seg.mask.index_select(0, i)
