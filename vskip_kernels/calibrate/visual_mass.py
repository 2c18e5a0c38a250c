"""FlashVLM Algorithm 1: mean visual attention mass A_v of the generated tokens, per layer.

Greedy generation; at every forward step (the prefill's last prompt position, then each
fed-back generated token) the one-pass mass kernel reports, per layer, the share of the
newest query's attention that lands on visual keys, averaged over heads. Sums over
tokens and samples divided by the token count give A_v; the lowest-A_v layers are the
ones bypassed during decode.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ._common import iter_batches, prepare, progress


def _eos_ids(model) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _counted_steps(generated: torch.Tensor, steps: int, eos: list[int]) -> torch.Tensor:
    """[B, steps] bool: step s counts for a sample unless it already produced EOS in tokens 1..s.

    Step 0 is the prefill (query = last prompt token); step s >= 1 feeds generated token s.
    """
    b = generated.shape[0]
    valid = torch.ones(b, steps, dtype=torch.bool, device=generated.device)
    if eos and steps > 1:
        is_eos = torch.isin(generated[:, : steps - 1], torch.tensor(eos, device=generated.device))
        valid[:, 1:] = is_eos.long().cumsum(dim=1) == 0
    return valid


def visual_mass_scores(
    model,
    handle,
    num_layers: int,
    batches,
    *,
    max_new_tokens: int,
    show_progress: bool = True,
    exclude: Iterable[int] = (),
) -> tuple[list[float], int, int]:
    """Returns (A_v per layer, number of samples, number of counted tokens).

    The mass is what the patched model's attention sees under the handle's plan: with prune
    stages, layers from a stage on attend only the kept visual tokens. Layers in ``exclude``
    (e.g. ones the plan bypasses on decode steps, which then record nothing) score +inf.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    eos = _eos_ids(model)
    skip = set(exclude)
    measured = [l for l in range(num_layers) if l not in skip]
    if not measured:
        raise ValueError("visual_mass has no layer left to measure: every layer is excluded")
    sums = torch.zeros(num_layers, dtype=torch.float64)
    tokens = 0
    samples = 0
    with torch.no_grad():
        for batch in progress(iter_batches(batches), show_progress, "calibrate[visual_mass]"):
            batch = prepare(batch, model)
            am = batch["attention_mask"]
            if bool((am[:, -1] == 0).any()):
                raise ValueError(
                    "visual_mass generates from the batch, which needs left padding "
                    "(attention_mask[:, -1] must be 1); set the tokenizer's padding_side='left'"
                )
            n_prompt = batch["input_ids"].shape[1]
            with handle.record_visual_mass() as rec:
                seqs = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=0,
                    do_sample=False,
                    num_beams=1,
                    use_cache=True,
                )
            generated = seqs[:, n_prompt:]
            steps = len(rec.per_layer.get(measured[0], []))
            if steps == 0 or any(len(rec.per_layer.get(l, [])) != steps for l in measured):
                got = {l: len(v) for l, v in rec.per_layer.items()}
                raise RuntimeError(f"the visual-mass recorder saw an uneven number of steps per layer: {got}")
            valid = _counted_steps(generated, steps, eos)  # [B, steps]
            w = valid.T.to(torch.float64)  # [steps, B]
            for l in measured:
                m = torch.stack([t.to(torch.float64) for t in rec.per_layer[l]])  # [steps, B, Hq]
                sums[l] += (m.mean(dim=-1) * w.to(m.device)).sum().cpu()
            tokens += int(valid.sum())
            samples += generated.shape[0]
    if samples == 0:
        raise ValueError("batches is empty: calibration needs at least one sample")
    scores = (sums / tokens).tolist()
    return [float("inf") if l in skip else v for l, v in enumerate(scores)], samples, tokens
