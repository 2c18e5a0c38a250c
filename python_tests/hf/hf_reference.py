"""An independent reference for a SkipPlan inside a transformers model.

It shares no code with ``vskip_kernels.hf``: the model runs its own eager attention, and
forward hooks impose the plan's semantics on it —

* vskip layers: the eager 4-D mask gets the policy AND-ed in (a visual query sees earlier
  text keys and itself, never other visual keys);
* frozen layers: after the layer ran densely, each visual position's output is replaced by
  its input (the token leaves the layer unchanged; its K/V were still computed);
* decode-bypassed layers: on a decode step (one new position on top of earlier ones) the
  layer's output is replaced by its input;
* prune stages (layer K, keep, rank): on the prompt call, layer K-1's attention
  probabilities (what eager attention returns, ``output_attentions``' tensor) rank the visual
  tokens still in play, and the dropped ones are masked out as keys of layers >= K in this and
  every later call. Their rows keep being computed; they are irrelevant to kept tokens.

Which positions are visual comes from the first call's ``input_ids`` (the family's image
and video ids); every later position is a generated, hence text, token. The cache is never
looked at: the number of earlier positions is ``attention_mask.shape[1] - input_ids.shape[1]``,
as generate() keeps the 2-D mask growing with the sequence (without a mask, the calls made
inside one ``plan_hooks`` context are taken as one sequence).
"""

from __future__ import annotations

import contextlib

import torch


def _visual_ids(model) -> list[int]:
    cfg = model.config
    return [
        v for v in (getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None)) if isinstance(v, int)
    ]


def _lm(model):
    for path in (("model", "language_model"), ("language_model",), ("model",)):
        m = model
        for name in path:
            m = getattr(m, name, None)
        if m is not None and hasattr(m, "layers"):
            return m
    raise TypeError(type(model).__name__)


@contextlib.contextmanager
def plan_hooks(model, vskip=(), frozen=(), bypass=(), prune=()):
    """Run ``model`` (eager attention) under the plan's semantics while the context is open.

    prune: dicts {"layer", "keep", "rank"}. Yields a dict whose "dropped" maps each stage
    layer to the [B, N] prompt positions dropped there."""
    model.set_attn_implementation("eager")
    layers = _lm(model).layers
    ids_vis = _visual_ids(model)
    st = {"prompt_vis": None, "prompt_real": None, "seq_len": 0, "nq": 0, "decode": False}
    out_state = {"dropped": {}}
    hooks = []

    def follow_beams(cache):
        """Beam search continues row i from row beam_idx[i]: its dropped positions go with it.
        (Beams of one prompt can rank differently: transformers 5.17 hands LLaVA-NeXT's beams
        of a multi-image prompt different image features.) The cache's reorder call is the one
        place generate() says so; nothing else of the cache is read."""
        if cache is None or getattr(cache, "_ref_follows_beams", False) or not prune:
            return
        reorder = cache.reorder_cache

        def reorder_and_follow(beam_idx):
            out_state["dropped"] = {k: v.index_select(0, beam_idx.cpu()) for k, v in out_state["dropped"].items()}
            return reorder(beam_idx)

        cache.reorder_cache = reorder_and_follow
        cache._ref_follows_beams = True

    def top_pre(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        am = kwargs.get("attention_mask")
        follow_beams(kwargs.get("cache", kwargs.get("past_key_values")))
        nq = ids.shape[1]
        # generate() drops an all-ones mask; then the calls of this context form one sequence
        seq_len = am.shape[1] if am is not None else st["seq_len"] + nq
        past = seq_len - nq
        if past == 0:
            st["prompt_vis"] = (
                torch.isin(ids, torch.tensor(ids_vis)) if ids_vis else torch.zeros_like(ids, dtype=torch.bool)
            )
            st["prompt_real"] = am.bool() if am is not None else torch.ones_like(ids, dtype=torch.bool)
            # keep=0 (VTW) withdraws every visual token at its layer: nothing to rank
            out_state["dropped"] = {s["layer"]: st["prompt_vis"] & st["prompt_real"] for s in prune if s["keep"] == 0}
        elif st["prompt_vis"].shape[0] != ids.shape[0]:  # beams: rows of one prompt are identical
            r = ids.shape[0] // st["prompt_vis"].shape[0]
            st["prompt_vis"] = st["prompt_vis"].repeat_interleave(r, 0)
            out_state["dropped"] = {k: v.repeat_interleave(r, 0) for k, v in out_state["dropped"].items()}
        st.update(seq_len=seq_len, nq=nq, decode=past > 0 and nq == 1)

    def key_visual(nk):
        """[B, nk]: visual flag of key positions 0..nk-1 (static-cache slots past the sequence: False)."""
        pv = st["prompt_vis"]
        out = torch.zeros(pv.shape[0], nk, dtype=torch.bool)
        n = min(pv.shape[1], nk)
        out[:, :n] = pv[:, :n]
        return out

    def query_visual():
        return key_visual(st["seq_len"])[:, st["seq_len"] - st["nq"] :]

    def vskip_pre(module, args, kwargs):
        mask = kwargs["attention_mask"]
        assert mask is not None and mask.dim() == 4, "the eager path should hand attention a 4-D mask"
        nk = mask.shape[-1]
        kv, qv = key_visual(nk), query_visual()
        q_pos = torch.arange(st["seq_len"] - st["nq"], st["seq_len"])
        self_key = q_pos[:, None] == torch.arange(nk)[None, :]
        allowed = ~(qv[:, :, None] & kv[:, None, :]) | self_key[None]
        kwargs["attention_mask"] = mask.masked_fill(~allowed[:, None], torch.finfo(mask.dtype).min)
        return args, kwargs

    def frozen_post(module, args, kwargs, out):
        h_in = args[0] if args else kwargs["hidden_states"]
        h_out = out[0] if isinstance(out, tuple) else out
        h_out = torch.where(query_visual()[:, :, None], h_in, h_out)
        return (h_out, *out[1:]) if isinstance(out, tuple) else h_out

    def bypass_post(module, args, kwargs, out):
        if not st["decode"]:
            return out
        h_in = args[0] if args else kwargs["hidden_states"]
        return (h_in, *out[1:]) if isinstance(out, tuple) else h_in

    def dropped_before(layer, nk):
        """[B, nk]: keys dropped by the stages at layers <= ``layer`` (later positions: kept)."""
        pv = st["prompt_vis"]
        out = torch.zeros(pv.shape[0], nk, dtype=torch.bool)
        for k, d in out_state["dropped"].items():
            if k <= layer:
                n = min(d.shape[1], nk)
                out[:, :n] |= d[:, :n]
        return out

    def prune_mask_pre(layer):
        def hook(module, args, kwargs):
            mask = kwargs["attention_mask"]
            if mask is None:
                b = st["prompt_vis"].shape[0]
                mask = torch.zeros(b, 1, st["nq"], st["seq_len"])
            drop = dropped_before(layer, mask.shape[-1])
            kwargs["attention_mask"] = mask.masked_fill(drop[:, None, None, :], torch.finfo(mask.dtype).min)
            return args, kwargs

        return hook

    def rank_post(stage):
        def hook(module, args, kwargs, out):
            if st["decode"] or st["seq_len"] != st["nq"]:  # rank the prompt, on its first call
                return out
            probs = out[1].float()  # [B, H, N, N]: eager attention's probabilities of layer K-1
            vis, real = st["prompt_vis"], st["prompt_real"]
            gone = dropped_before(stage["layer"] - 1, vis.shape[1])
            candidates = vis & real & ~gone
            counts = [round(stage["keep"] * int(c)) for c in (vis & real).sum(1)]
            if stage.get("rank", "last") == "last":
                score = probs[:, :, -1, :].mean(1)
            else:
                allowed = kwargs["attention_mask"][:, 0] == 0  # [B, N, N]
                chosen = real & ~gone
                if stage["layer"] - 1 in frozen:  # a frozen layer gives visual queries no row
                    chosen = chosen & ~vis
                allowed = allowed & chosen[:, :, None]
                total = (probs * allowed[:, None]).sum(2).mean(1)
                n = allowed.sum(1)
                score = torch.where(n > 0, total / n.clamp_min(1), torch.zeros_like(total))
            dropped = torch.zeros_like(candidates)
            for b in range(vis.shape[0]):
                cand = candidates[b].nonzero().squeeze(1).tolist()
                order = sorted(cand, key=lambda j: (-float(score[b, j]), j))
                for j in order[counts[b] :]:
                    dropped[b, j] = True
            out_state["dropped"][stage["layer"]] = dropped
            return out

        return hook

    try:
        hooks.append(model.register_forward_pre_hook(top_pre, with_kwargs=True))
        for i in vskip:
            hooks.append(layers[i].self_attn.register_forward_pre_hook(vskip_pre, with_kwargs=True))
        for i in frozen:
            hooks.append(layers[i].register_forward_hook(frozen_post, with_kwargs=True))
        for i in bypass:
            hooks.append(layers[i].register_forward_hook(bypass_post, with_kwargs=True))
        if prune:
            first = min(s["layer"] for s in prune)
            for i in range(first, len(layers)):
                hooks.append(layers[i].self_attn.register_forward_pre_hook(prune_mask_pre(i), with_kwargs=True))
            for stage in prune:
                if stage["keep"] > 0:
                    attn = layers[stage["layer"] - 1].self_attn
                    hooks.append(attn.register_forward_hook(rank_post(stage), with_kwargs=True))
        yield out_state
    finally:
        for h in hooks:
            h.remove()
