"""Calibration data from a JSON-lines file: one {"image" | "images", "prompt"} object per line.

Image paths are relative to the data file's folder unless absolute. Every problem is
reported as a ``DataError`` naming the file and line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass


class DataError(ValueError):
    """A calibration data file, row or image that cannot be used."""


@dataclass
class Row:
    prompt: str
    images: list[str]
    where: str  # "file:line", for messages


def read_rows(path: str, *, require_image: bool = True) -> list[Row]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read data file {path!r}: {getattr(exc, 'strerror', None) or exc}") from None
    base = os.path.dirname(os.path.abspath(path))
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: each line must be a JSON object with 'prompt' and 'image' or 'images'")
        unknown = sorted(set(obj) - {"prompt", "image", "images"})
        if unknown:
            raise DataError(f"{where}: unknown keys {unknown}; expected 'prompt' and 'image' or 'images'")
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: 'prompt' must be a non-empty string")
        if "image" in obj and "images" in obj:
            raise DataError(f"{where}: give 'image' or 'images', not both")
        images = obj.get("images", [obj["image"]] if "image" in obj else [])
        if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
            raise DataError(f"{where}: 'image' must be a path string and 'images' a list of path strings")
        if require_image and not images:
            raise DataError(f"{where}: the row has no image ('image' or 'images')")
        rows.append(Row(prompt, [p if os.path.isabs(p) else os.path.join(base, p) for p in images], where))
    if not rows:
        raise DataError(f"data file {path!r} holds no rows")
    return rows


def load_image(path: str, where: str = ""):
    from PIL import Image, UnidentifiedImageError

    prefix = f"{where}: " if where else ""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{prefix}image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{prefix}cannot read image {path}: {exc}") from None


def check_images(rows: list[Row]) -> None:
    """Fail fast on missing or unreadable images, before a large model is loaded."""
    from PIL import Image, UnidentifiedImageError

    for r in rows:
        for p in r.images:
            try:
                with Image.open(p) as im:
                    im.verify()
            except FileNotFoundError:
                raise DataError(f"{r.where}: image not found: {p}") from None
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
                raise DataError(f"{r.where}: cannot read image {p}: {exc}") from None


def prompt_text(processor, prompt: str, num_images: int) -> str:
    """The prompt in the model's chat template, with one image slot per image."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    token = getattr(processor, "image_token", None)
    if num_images and token is None:
        raise DataError("the processor has neither a chat template nor an image token to place images with")
    return (token or "") * num_images + ("\n" if num_images else "") + prompt


def encode(processor, prompts: list[str], images: list[list]) -> dict:
    """Processor inputs for a batch, left-padded (generation appends on the right)."""
    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = "left"
    texts = [prompt_text(processor, p, len(im)) for p, im in zip(prompts, images)]
    flat = [im for ims in images for im in ims]
    kwargs = {"text": texts, "return_tensors": "pt", "padding": True}
    if flat:
        kwargs["images"] = flat
    return dict(processor(**kwargs))


def batches(processor, rows: list[Row], batch_size: int = 1) -> Iterator[dict]:
    """Encoded batches of ``batch_size`` rows; images are opened lazily, batch by batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        imgs = [[load_image(p, r.where) for p in r.images] for r in chunk]
        try:
            yield encode(processor, [r.prompt for r in chunk], imgs)
        except DataError:
            raise
        except (ValueError, TypeError) as exc:
            raise DataError(f"{chunk[0].where}: the processor rejected this row: {exc}") from None
