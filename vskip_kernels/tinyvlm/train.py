"""Train the tiny VLM on the synthetic task (CPU is enough) and save it for ``load_pretrained``.

    python -m vskip_kernels.tinyvlm.train --out vskip_kernels/tinyvlm/weights

The defaults are the recipe of the shipped weights (seed 0, 2600 steps of 24 images with six
question/answer turns each, peak learning rate 3e-3, the visual-token probe).

Step s trains on training samples [s * batch, (s + 1) * batch): fresh scenes every step,
so the model cannot memorise them. Same seed, steps and thread count give the same weights.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time

import numpy as np
import torch

from .data import PATCH_CLASSES, PATCH_ORDINALS, encode_training_dialogues, patch_targets
from .evaluate import accuracy, question_prior_accuracy, teacher_forced_correct
from .model import build_model, build_processor
from .task import QUESTION_TYPES, samples

EVAL_SAMPLES = 500  # the first samples of the eval split: what the README and the tests report


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


PROBE_OUTPUTS = list(PATCH_CLASSES.values()) + [n - 1 for n in PATCH_ORDINALS.values()]


def probe_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over targets: cross-entropy for the classes, binary cross-entropy of the thermometer bits for ordinals."""
    parts = logits.split(PROBE_OUTPUTS, dim=-1)
    losses = []
    for k, part in enumerate(parts):
        t = target[..., k]
        if k < len(PATCH_CLASSES):
            losses.append(torch.nn.functional.cross_entropy(part.flatten(0, -2), t.flatten()))
        else:
            bits = (t[..., None] > torch.arange(part.shape[-1])).float()
            losses.append(torch.nn.functional.binary_cross_entropy_with_logits(part, bits))
    total = losses[0]
    for x in losses[1:]:  # summed in this order, as the shipped weights were trained
        total = total + x
    return total / len(losses)


def train(
    *,
    seed: int = 0,
    steps: int = 2600,
    batch: int = 24,
    lr: float = 3e-3,
    warmup: int = 100,
    threads: int = 1,
    out: str | None = None,
    log_every: int = 50,
    eval_every: int = 200,
    arch: dict | None = None,
    eval_samples: int = EVAL_SAMPLES,
    command: str | None = None,
    init: str | None = None,
    first_sample: int = 0,
    questions: int = 6,
    probe_weight: float = 1.0,
    log=print,
) -> dict:
    """Train (or, with ``init``, continue training) and return the training record.

    init: a folder an earlier run saved; training continues from its weights (a second
    stage), on training samples from ``first_sample`` on so no scene is seen twice.
    questions: question/answer turns per image (the sample's own first, then others about
    the same scene).
    probe_weight: weight of the visual-token probe loss: a linear head, used only in
    training and not saved, reads each visual token's cell contents (shape, colour, size)
    and cell row and column (``data.PATCH_TARGETS``) from the projector's output, so the visual features say what is
    where (the job a pretrained vision encoder does for LLaVA) and the decoder's
    attention has something to look for from the first steps. 0 turns it off.
    """
    for name, v in (("steps", steps), ("batch", batch), ("threads", threads), ("warmup", warmup)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    torch.set_num_threads(threads)
    processor = build_processor()
    previous = None
    if init is not None:
        from .model import load_pretrained

        if arch:
            raise ValueError("arch cannot be changed when continuing from init")
        model, _ = load_pretrained(init)
        with open(os.path.join(init, "training.json"), encoding="utf-8") as f:
            previous = json.load(f)
        torch.manual_seed(seed)
    else:
        model = build_model(seed=seed, **(arch or {}))
    model.train()
    probe = torch.nn.Linear(model.config.text_config.hidden_size, sum(PROBE_OUTPUTS))
    visual: list[torch.Tensor] = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: visual.append(out))
    patch = model.config.vision_config.patch_size
    params = list(model.named_parameters()) + [("probe." + n, p) for n, p in probe.named_parameters()]
    decay = [p for n, p in params if p.dim() > 1 and "embed" not in n]
    other = [p for n, p in params if not (p.dim() > 1 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98)
    )
    t0 = time.time()
    running = None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        data = samples("train", first_sample + step * batch, batch)
        enc = encode_training_dialogues(processor, data, questions, np.random.default_rng([seed, first_sample, step]))
        visual.clear()
        loss = lm_loss = model(**enc).loss
        if probe_weight:
            loss = loss + probe_weight * probe_loss(probe(visual[0]), patch_targets(data, patch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        now = torch.stack([lm_loss.detach(), loss.detach() - lm_loss.detach()])
        running = now if running is None else 0.9 * running + 0.1 * now
        if (step + 1) % log_every == 0:
            log(
                f"step {step + 1}/{steps} loss {running[0]:.4f} probe {running[1]:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{time.time() - t0:.0f}s"
            )
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            model.eval()
            held_out = samples("eval", 0, 200)
            ok = teacher_forced_correct(model, processor, held_out).tolist()
            per_type = " ".join(
                f"{t} {sum(o for o, s in zip(ok, held_out) if s.qtype == t) / max(sum(s.qtype == t for s in held_out), 1):.2f}"
                for t in QUESTION_TYPES
            )
            log(f"step {step + 1}: eval accuracy (200, teacher-forced) {sum(ok) / len(ok):.3f} ({per_type})")
            model.train()
    minutes = (time.time() - t0) / 60
    hook.remove()
    model.eval()
    acc = accuracy(model, processor, "eval", 0, eval_samples)
    prior = question_prior_accuracy(samples("train", 0, first_sample + steps * batch), samples("eval", 0, eval_samples))
    record = {
        "seed": seed,
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "warmup": warmup,
        "threads": threads,
        "train_minutes": round(minutes, 1),
        "eval_samples": eval_samples,
        "arch": arch or {},
        "eval_accuracy": acc["accuracy"],
        "eval_accuracy_per_type": acc["per_type"],
        "text_only_question_prior_accuracy": prior,
        "command": command,
        "first_sample": first_sample,
        "questions": questions,
        "probe_weight": probe_weight,
    }
    if previous is not None:
        record["previous_stage"] = previous
    log(json.dumps(record, indent=1))
    if out:
        os.makedirs(out, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        with open(os.path.join(out, "training.json"), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
    return record


def main(argv=None) -> int:
    # the defaults are train()'s: the recipe of the shipped weights
    default = {k: v.default for k, v in inspect.signature(train).parameters.items()}
    p = argparse.ArgumentParser(prog="python -m vskip_kernels.tinyvlm.train", description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=default["seed"])
    p.add_argument("--steps", type=int, default=default["steps"])
    p.add_argument("--batch", type=int, default=default["batch"])
    p.add_argument("--lr", type=float, default=default["lr"])
    p.add_argument("--warmup", type=int, default=default["warmup"])
    # One thread: these matrices are small, and on a shared machine two threads were several
    # times slower than one. Float results depend slightly on the thread count.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--hidden", type=int, default=None, help="text hidden size (default: the shipped architecture)")
    p.add_argument("--ffn", type=int, default=None, help="text FFN size")
    p.add_argument("--kv-heads", type=int, default=None, help="text key/value heads")
    p.add_argument("--out", default=None, help="folder to save the model, processor and training.json in")
    p.add_argument("--eval-every", type=int, default=default["eval_every"])
    p.add_argument("--log-every", type=int, default=default["log_every"])
    p.add_argument("--init", default=None, help="continue from a folder an earlier run saved (a second stage)")
    p.add_argument(
        "--first-sample", type=int, default=default["first_sample"], help="index of the first training sample used"
    )
    p.add_argument(
        "--questions", type=int, default=default["questions"], help="question/answer turns per training image"
    )
    p.add_argument(
        "--probe-weight",
        type=float,
        default=default["probe_weight"],
        help="weight of the visual-token probe loss (0: off)",
    )
    a = p.parse_args(argv)
    train(
        seed=a.seed,
        steps=a.steps,
        batch=a.batch,
        lr=a.lr,
        warmup=a.warmup,
        threads=a.threads,
        out=a.out,
        eval_every=a.eval_every,
        log_every=a.log_every,
        arch={k: v for k, v in (("hidden", a.hidden), ("ffn", a.ffn), ("kv_heads", a.kv_heads)) if v is not None},
        command=" ".join(["python -m vskip_kernels.tinyvlm.train"] + list(sys.argv[1:] if argv is None else argv)),
        init=a.init,
        first_sample=a.first_sample,
        questions=a.questions,
        probe_weight=a.probe_weight,
        log=lambda s: print(s, flush=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
