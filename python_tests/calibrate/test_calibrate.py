"""Calibration metrics against independent computations on tiny random models."""

import math

import pytest
import torch

from python_tests import hf_models as H
from vskip_kernels import SkipPlan
from vskip_kernels.calibrate import METHODS, calibrate, diagnostics
from vskip_kernels.calibrate._common import resolve_budget
from vskip_kernels.hf import apply_skip_plan

pytestmark = pytest.mark.hf

LAYERS = 4
# All fp32 on both sides: the tolerance is fp32 rounding of the same math done in another order.
ATOL = 1e-5


@pytest.fixture(scope="module")
def llava():
    return H.tiny_llava(seed=1, layers=LAYERS)


@pytest.fixture(scope="module")
def batch(llava):
    return H.make_inputs(llava, batch=2, seed=3)


def _hidden_states(model, batch):
    """x_0..x_L: the inputs of the L decoder layers from output_hidden_states, and x_L, the
    last layer's output, as it enters the final norm (releases differ in whether
    hidden_states[-1] is taken before or after that norm)."""
    from vskip_kernels.hf import language_model

    seen = []
    hook = language_model(model).norm.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True, use_cache=False)
    finally:
        hook.remove()
    layers = len(out.hidden_states) - 1
    return [h.double() for h in out.hidden_states[:layers]] + [seen[-1].double()]


def _is_visual(batch):
    return batch["input_ids"] == H.IMAGE_ID


# -- budgets and plans -------------------------------------------------------------------------


def test_budget_rules():
    assert resolve_budget(32, 19, None) == 19
    assert resolve_budget(28, None, 0.2) == 5  # FlashVLM: floor(r * L)
    assert resolve_budget(100, None, 0.29) == 29  # exact decimal floor, not 28 from float rounding
    assert resolve_budget(8, None, 1.0) == 8 and resolve_budget(8, 0, None) == 0
    with pytest.raises(ValueError, match="exactly one"):
        resolve_budget(8, None, None)
    with pytest.raises(ValueError, match="exactly one"):
        resolve_budget(8, 2, 0.5)
    with pytest.raises(ValueError, match="budget"):
        resolve_budget(8, 9, None)
    with pytest.raises(ValueError, match="skip_ratio"):
        resolve_budget(8, None, 1.5)
    with pytest.raises(TypeError, match="budget"):
        resolve_budget(8, 2.0, None)


def test_plan_metadata_and_json_round_trip(llava, batch, tmp_path):
    plan = calibrate(llava, [batch], "cosine", skip_ratio=0.5, seed=7, progress=False)
    assert plan.budget == 2 and len(plan.decode_bypass_layers) == 2
    assert plan.method == "cosine" and len(plan.scores) == LAYERS
    assert plan.model["architecture"] == "LlavaForConditionalGeneration" and plan.model["num_layers"] == LAYERS
    assert plan.calibration["seed"] == 7 and plan.calibration["num_samples"] == 2
    assert plan.calibration["skip_ratio"] == 0.5 and plan.calibration["options"]["tokens"] == "all"
    plan.save(tmp_path / "p.json")
    again = SkipPlan.load(tmp_path / "p.json")
    assert again.to_dict() == plan.to_dict()


def test_calibrate_argument_errors(llava, batch):
    with pytest.raises(ValueError, match="exactly one"):
        calibrate(llava, [batch], "cosine", progress=False)
    with pytest.raises(ValueError, match="method"):
        calibrate(llava, [batch], "magic", budget=1, progress=False)
    with pytest.raises(TypeError, match="unknown"):
        calibrate(llava, [batch], "cosine", budget=1, progress=False, colour="red")
    with pytest.raises(ValueError, match="target"):
        calibrate(llava, [batch], "depth", budget=1, target="everything")
    with pytest.raises(ValueError, match="n must equal"):
        calibrate(llava, [batch], "angular", budget=2, n=3, progress=False)
    with pytest.raises(ValueError, match="kl_direction"):
        calibrate(llava, [batch], "vig", budget=1, kl_direction="sideways", progress=False)
    with pytest.raises(ValueError, match="empty"):
        calibrate(llava, [], "cosine", budget=1, progress=False)
    right = {k: v.clone() for k, v in batch.items()}
    right["attention_mask"] = right["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="left padding"):
        calibrate(llava, [right], "visual_mass", budget=1, max_new_tokens=2, progress=False)


def test_depth_random_and_targets(llava):
    d = calibrate(llava, None, "depth", budget=2)
    assert d.decode_bypass_layers == [2, 3]
    r1 = calibrate(llava, None, "random", budget=2, seed=5, target="frozen")
    r2 = calibrate(llava, None, "random", budget=2, seed=5, target="frozen")
    assert r1.frozen_layers == r2.frozen_layers and len(r1.frozen_layers) == 2 and not r1.decode_bypass_layers
    assert sorted(range(LAYERS), key=lambda i: (r1.scores[i], i))[:2] == r1.frozen_layers
    assert set(METHODS) == {"visual_mass", "vig", "lc", "cosine", "angular", "l2", "depth", "random"}


# -- hidden-state baselines --------------------------------------------------------------------


@pytest.mark.parametrize("tokens", ["all", "visual", "last"])
def test_cosine_l2_match_hidden_states(llava, batch, tokens):
    xs = _hidden_states(llava, batch)
    real = batch["attention_mask"].bool()
    sel = {"all": real, "visual": real & _is_visual(batch)}.get(tokens)
    if sel is None:
        sel = torch.zeros_like(real)
        sel[:, -1] = True  # left padding: the last column is every row's last token
    cos = [torch.nn.functional.cosine_similarity(xs[l][sel], xs[l + 1][sel], dim=-1) for l in range(LAYERS)]
    want_cos = [float((1 - c).mean()) for c in cos]
    want_l2 = [float((xs[l][sel].norm(dim=-1) - xs[l + 1][sel].norm(dim=-1)).abs().mean()) for l in range(LAYERS)]
    pc = calibrate(llava, [batch], "cosine", budget=2, tokens=tokens, progress=False)
    pl = calibrate(llava, [batch], "l2", budget=1, tokens=tokens, progress=False)
    assert pc.scores == pytest.approx(want_cos, abs=ATOL)
    assert pl.scores == pytest.approx(want_l2, abs=ATOL * 10)  # norms are O(10): same relative precision
    assert pc.decode_bypass_layers == sorted(sorted(range(LAYERS), key=lambda i: want_cos[i])[:2])
    assert pl.decode_bypass_layers == [min(range(LAYERS), key=lambda i: want_l2[i])]


def test_angular_block_matches_hidden_states(llava, batch):
    xs = _hidden_states(llava, batch)
    n = 2

    def dist(a, b):
        c = torch.nn.functional.cosine_similarity(a[:, -1], b[:, -1], dim=-1).clamp(-1, 1)
        return float((torch.arccos(c) / math.pi).mean())

    want = [dist(xs[l], xs[min(l + n, LAYERS)]) for l in range(LAYERS)]
    plan = calibrate(llava, [batch], "angular", budget=n, progress=False)
    assert plan.scores == pytest.approx(want, abs=ATOL)
    start = min(range(LAYERS - n + 1), key=lambda i: want[i])
    assert plan.decode_bypass_layers == [start, start + 1]


# -- FlashVLM visual mass ------------------------------------------------------------------------


def test_visual_mass_matches_eager_attention(batch):
    model = H.tiny_llava(seed=1, layers=LAYERS)
    steps = 4
    with torch.no_grad():
        probe = model.generate(**batch, max_new_tokens=steps, do_sample=False)
    n = batch["input_ids"].shape[1]
    # Make sample 0's second generated token the EOS: its later steps must not count.
    eos = int(probe[0, n + 1])
    model.generation_config.eos_token_id = eos
    plan = calibrate(model, [batch], "visual_mass", budget=1, max_new_tokens=steps, progress=False)

    with torch.no_grad():
        seqs = model.generate(**batch, max_new_tokens=steps, do_sample=False)
    gen = seqs[:, n:]
    assert not bool((gen == H.IMAGE_ID).any())
    fed = seqs[:, : n + gen.shape[1] - 1]
    am = torch.cat([batch["attention_mask"], torch.ones_like(fed[:, n:])], 1)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(
            input_ids=fed,
            attention_mask=am,
            pixel_values=batch["pixel_values"],
            output_attentions=True,
            use_cache=False,
        )
    vis = torch.cat([_is_visual(batch), torch.zeros_like(fed[:, n:], dtype=torch.bool)], 1)
    sums, count = [0.0] * LAYERS, 0
    for b in range(fed.shape[0]):
        first_eos = next((i for i, t in enumerate(gen[b].tolist()) if t == eos), gen.shape[1] - 1)
        for s in range(min(first_eos, gen.shape[1] - 1) + 1):
            count += 1
            for l in range(LAYERS):
                row = out.attentions[l][b, :, n - 1 + s].double()  # [H, Nk]
                sums[l] += float(row[:, vis[b]].sum(-1).mean())
    assert count < 2 * gen.shape[1]  # the EOS really cut sample 0 short
    assert plan.calibration["num_tokens"] == count
    assert plan.scores == pytest.approx([s / count for s in sums], abs=ATOL)
    assert plan.decode_bypass_layers == [min(range(LAYERS), key=lambda i: sums[i])]


# -- VIG / LC: the replay equals full perturbed forwards ---------------------------------------------


def _kl(p_log, q_log):
    return (p_log.exp() * (p_log - q_log)).sum(-1)


@pytest.mark.parametrize(
    "method,policy,direction", [("vig", "vskip", "forward"), ("lc", "frozen", "forward"), ("lc", "frozen", "reverse")]
)
def test_kl_scores_match_full_perturbed_runs(llava, batch, method, policy, direction):
    plan = calibrate(llava, [batch], method, budget=2, kl_direction=direction, progress=False)
    handle = apply_skip_plan(llava, SkipPlan(num_layers=LAYERS))
    want = []
    try:
        with torch.no_grad():
            dense = torch.log_softmax(llava(**batch, use_cache=False).logits[:, -1].double(), -1)
            for l in range(LAYERS):
                handle.set_plan(SkipPlan(num_layers=LAYERS, **{f"{policy}_layers": [l]}))
                pert = torch.log_softmax(llava(**batch, use_cache=False).logits[:, -1].double(), -1)
                d = _kl(dense, pert) if direction == "forward" else _kl(pert, dense)
                want.append(float(d.mean()))
    finally:
        handle.remove()
    assert max(want) > 1e-5  # the policy visibly moves this model's output
    assert plan.scores == pytest.approx(want, rel=1e-3, abs=1e-7)
    field = f"{policy}_layers"
    assert getattr(plan, field) == sorted(sorted(range(LAYERS), key=lambda i: (want[i], i))[:2])
    assert plan.calibration["options"]["kl_direction"] == direction


def test_vig_num_samples_caps_the_set(llava, batch):
    one = {k: v[1:] for k, v in batch.items()}  # sample 1 alone: one image, so pixel_values slice too
    capped = calibrate(llava, [one, batch], "vig", budget=1, num_samples=1, progress=False)
    alone = calibrate(llava, [one], "vig", budget=1, progress=False)
    assert capped.calibration["num_samples"] == 1
    assert capped.scores == pytest.approx(alone.scores, rel=1e-5, abs=1e-9)


# -- Skip-It diagnostics -----------------------------------------------------------------------------


def test_diagnostics_match_eager_and_hidden_states(batch):
    model = H.tiny_llava(seed=1, layers=LAYERS)
    res = diagnostics(model, [batch], progress_bar=False)
    xs = _hidden_states(model, batch)
    real = batch["attention_mask"].bool()
    vis = _is_visual(batch) & real
    for name, sel in (("visual_cosine_distance", vis), ("text_cosine_distance", real & ~vis)):
        want = [
            float((1 - torch.nn.functional.cosine_similarity(xs[l][sel], xs[l + 1][sel], dim=-1)).mean())
            for l in range(LAYERS)
        ]
        assert res[name] == pytest.approx(want, abs=ATOL)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(**batch, output_attentions=True, use_cache=False).attentions
    queries = real & ~vis & (vis.long().cumsum(1) > 0)
    want = [
        float(torch.stack([att[l][b].double()[:, :, vis[b]].sum(-1).mean(0) for b in range(2)])[queries].mean())
        for l in range(LAYERS)
    ]
    assert res["visual_attention_ratio"] == pytest.approx(want, abs=ATOL)
    assert res["num_samples"] == 2


def test_progress_bars_stay_silent_when_stderr_is_not_a_terminal(llava, batch, capfd):
    """CI logs get no bars (and never nested ones printed line after line)."""
    calibrate(llava, [batch], "vig", budget=1, progress=True)
    err = capfd.readouterr().err
    assert "calibrate[" not in err and "it/s" not in err, err[-500:]
