"""The shipped tiny VLM: loads, reaches its reported accuracy, and needs the image to do so."""

import json
import os

import pytest
import torch

from vskip_kernels.tinyvlm import WEIGHTS_DIR, build_model, build_processor, load_pretrained
from vskip_kernels.tinyvlm.data import encode_prompts, encode_training
from vskip_kernels.tinyvlm.evaluate import accuracy, generate_answers, question_prior_accuracy, teacher_forced_correct
from vskip_kernels.tinyvlm.task import chance_accuracy, samples

EVAL = 500  # the evaluation subset the README and training.json report on


@pytest.fixture(scope="module")
def shipped():
    return load_pretrained()


@pytest.fixture(scope="module")
def record():
    with open(os.path.join(WEIGHTS_DIR, "training.json"), encoding="utf-8") as f:
        return json.load(f)


def test_tokenizer_words_and_characters():
    tok = build_processor().tokenizer
    ids = tok("what colour is the circle?\ncircle</s>")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == [
        "what",
        " colour",
        " is",
        " the",
        " circle",
        "?",
        "\n",
        "c",
        "i",
        "r",
        "c",
        "l",
        "e",
        "</s>",
    ]


def test_training_labels_cover_answer_and_eos_only():
    proc = build_processor()
    batch = samples("train", 0, 6)
    enc = encode_training(proc, batch)
    for row, lab, s in zip(enc["input_ids"], enc["labels"], batch):
        kept = lab[lab != -100]
        assert proc.tokenizer.convert_ids_to_tokens(kept.tolist()) == list(s.answer) + ["</s>"]
        assert torch.equal(row[-len(kept) :], kept)
    prompt = encode_prompts(proc, batch)
    assert int((prompt["input_ids"][0] == 4).sum()) == 64  # 64 visual tokens per image


def test_shipped_model_shape(shipped):
    model, _ = shipped
    assert model.config.text_config.num_hidden_layers == 12
    assert model.config.image_token_id == 4
    size = sum(os.path.getsize(os.path.join(WEIGHTS_DIR, f)) for f in os.listdir(WEIGHTS_DIR))
    assert size < 10 * 2**20  # a few MB shipped in the package


def test_shipped_model_reaches_reported_accuracy(shipped, record):
    model, proc = shipped
    res = accuracy(model, proc, "eval", 0, EVAL)
    assert record["eval_samples"] == EVAL
    # same samples, same weights: only float summation order may differ between machines
    assert res["accuracy"] >= record["eval_accuracy"] - 0.02, res
    chance = chance_accuracy(s.qtype for s in samples("eval", 0, EVAL))
    # The shipped model answers every question type (README: 98.8% on these 500; chance
    # 20-50% per type). 100 samples per type: 0.9 is several binomial sigmas below 0.95.
    assert res["accuracy"] > 0.95 > chance + 0.5, (res, chance)
    assert min(res["per_type"].values()) > 0.9, res["per_type"]


def test_answers_need_the_image(shipped):
    """Each question paired with another scene's image: the model falls to about chance."""
    model, proc = shipped
    data = samples("eval", 0, 200)
    images = [s.image() for s in data]
    shifted = images[7:] + images[:7]  # same question types, unrelated scenes
    from vskip_kernels.calibrate.data import encode
    from vskip_kernels.tinyvlm.evaluate import decode_answer, prepare_inputs

    right = 0
    for i in range(0, len(data), 50):
        inputs = prepare_inputs(
            encode(proc, [s.question for s in data[i : i + 50]], [[im] for im in shifted[i : i + 50]]), model
        )
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        for s, g in zip(data[i : i + 50], out[:, inputs["input_ids"].shape[1] :]):
            right += decode_answer(proc.tokenizer, g) == s.answer
    chance = chance_accuracy(s.qtype for s in data)
    assert right / len(data) < chance + 0.1, (right / len(data), chance)


def test_text_only_control_near_chance(record):
    """The best text-only answer (most frequent training answer per question) is near chance."""
    train, ev = samples("train", 0, 20000), samples("eval", 0, EVAL)
    prior = question_prior_accuracy(train, ev)
    chance = chance_accuracy(s.qtype for s in ev)
    assert abs(prior - chance) < 0.05, (prior, chance)
    assert abs(record["text_only_question_prior_accuracy"] - chance) < 0.05


def test_teacher_forced_equals_greedy(shipped):
    model, proc = shipped
    data = samples("eval", 0, 64)
    answers, _ = generate_answers(model, proc, data)
    ok = teacher_forced_correct(model, proc, data)
    assert ok.tolist() == [a == s.answer for a, s in zip(answers, data)]


def test_train_writes_a_loadable_model(tmp_path):
    from vskip_kernels.tinyvlm.train import train

    rec = train(
        seed=1,
        steps=2,
        batch=4,
        warmup=1,
        threads=1,
        out=str(tmp_path),
        eval_every=0,
        log=lambda s: None,
        eval_samples=8,
        arch={"layers": 2},
    )
    assert rec["steps"] == 2 and 0.0 <= rec["eval_accuracy"] <= 1.0
    model, proc = load_pretrained(str(tmp_path))
    assert model.config.text_config.num_hidden_layers == 2
    assert json.loads((tmp_path / "training.json").read_text())["seed"] == 1


def test_load_pretrained_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors missing"):
        load_pretrained(str(tmp_path))


def test_untrained_model_is_deterministic():
    a, b = build_model(num_layers=2, seed=3), build_model(num_layers=2, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="num_layers"):
        build_model(num_layers=0)
    with pytest.raises(TypeError, match="unknown architecture"):
        build_model(colour=3)


def test_dialogue_rows_put_the_evaluation_prompt_first():
    """Training rows with several turns: the first turn is exactly what evaluation feeds the
    model (encode_training's row), every answer and EOS is labelled, nothing else is."""
    import numpy as np

    from vskip_kernels.tinyvlm.data import encode_training_dialogues
    from vskip_kernels.tinyvlm.task import scene_questions

    proc = build_processor()
    batch = samples("train", 0, 5)
    one = encode_training(proc, batch)
    enc = encode_training_dialogues(proc, batch, 4, np.random.default_rng(0))
    tok = proc.tokenizer
    assert torch.equal(enc["pixel_values"], one["pixel_values"])
    for i, s in enumerate(batch):
        row = enc["input_ids"][i][enc["attention_mask"][i].bool()]
        first = one["input_ids"][i][one["attention_mask"][i].bool()]
        assert torch.equal(row[: len(first)], first)
        text = "".join(tok.convert_ids_to_tokens(row[len(first) :].tolist()))
        turns = [t for t in text.split("</s>") if t]
        truth = {q: a for q, a, _ in scene_questions(s.shapes)}
        assert len(turns) == min(3, len(truth) - 1)
        for t in turns:
            q, a = t.split("\n")
            assert truth[q] == a and q != s.question
        labels = enc["labels"][i][enc["attention_mask"][i].bool()]
        kept = tok.convert_ids_to_tokens(labels[labels != -100].tolist())
        assert "".join(kept) == s.answer + "</s>" + "".join(t.split("\n")[1] + "</s>" for t in turns)
    assert (enc["labels"][~enc["attention_mask"].bool()] == -100).all()


def test_patch_targets_match_the_rendered_pixels():
    """The probe's per-token targets agree with the image: occupied patches hold the shape's colour."""
    import numpy as np

    from vskip_kernels.tinyvlm.data import PATCH_TARGETS, patch_targets
    from vskip_kernels.tinyvlm.task import BACKGROUND, COLOURS

    batch = samples("train", 0, 20)
    tgt = patch_targets(batch, 8)
    assert tgt.shape == (20, 64, len(PATCH_TARGETS))
    colours = [None] + list(COLOURS.values())
    for s, t in zip(batch, tgt):
        px = np.asarray(s.image()).reshape(8, 8, 8, 8, 3).transpose(0, 2, 1, 3, 4).reshape(64, 64, 3)
        for p in range(64):
            present = {tuple(c) for c in px[p].tolist()} - {BACKGROUND}
            if t[p, 0] == 0:
                assert not present, (p, present)  # empty cell: only background in the patch
            else:
                assert colours[int(t[p, 1])] in present or not present  # a small shape may miss a corner patch
        assert t[:, 3].tolist() == [r // 2 for r in range(8) for _ in range(8)]
        assert t[:, 4].tolist() == [c // 2 for _ in range(8) for c in range(8)]


def test_probe_loss_reads_ordinals_as_thermometer_bits():
    """A probe that outputs the right classes and bits (large margins) has ~0 loss; one off by a
    single row or column does not."""
    from vskip_kernels.tinyvlm.data import PATCH_CLASSES, patch_targets
    from vskip_kernels.tinyvlm.train import PROBE_OUTPUTS, probe_loss

    target = patch_targets(samples("train", 0, 3), 8)

    def logits_for(t):
        parts = []
        for k, n in enumerate(PROBE_OUTPUTS):
            if k < len(PATCH_CLASSES):
                parts.append(torch.nn.functional.one_hot(t[..., k], n).float() * 40 - 20)
            else:
                parts.append(torch.where(t[..., k, None] > torch.arange(n), 20.0, -20.0))
        return torch.cat(parts, -1)

    assert probe_loss(logits_for(target), target) < 1e-6
    shifted = target.clone()
    shifted[..., -1] = (shifted[..., -1] + 1) % 4  # every column off by one (3 wraps to 0)
    assert probe_loss(logits_for(shifted), target) > 1.0


def test_training_defaults_are_the_shipped_recipe(record, monkeypatch):
    """`python -m vskip_kernels.tinyvlm.train` with no flags trains what ships (training.json)."""
    import functools

    from vskip_kernels.tinyvlm import train as train_mod

    seen = {}

    @functools.wraps(train_mod.train)  # keeps train's signature, where main reads its defaults
    def fake_train(**kw):
        seen.update(kw)
        return {}

    monkeypatch.setattr(train_mod, "train", fake_train)
    train_mod.main([])
    for key in ("seed", "steps", "batch", "lr", "warmup", "threads", "questions", "probe_weight", "first_sample"):
        assert seen[key] == record[key], key
    assert seen["arch"] == record["arch"] == {}
