"""Generation parameters stored in PNG files: a tEXt chunk with key "pixsigma" holding JSON.

`save_png` writes atomically (through `pixsigma.io.atomic_write`) and refuses to replace an
existing file unless overwrite=True; `png_bytes` encodes the same PNG in memory (for a server's
response); `read_png_params` returns the dict back.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from pixsigma.errors import PixsigmaError
from pixsigma.io import atomic_write

PNG_KEY = "pixsigma"


def _png_info(params: dict | None):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if params is not None:
        info.add_text(PNG_KEY, json.dumps(params, ensure_ascii=False, sort_keys=True))
    return info


def save_png(image, path, params: dict | None = None, overwrite: bool = False) -> Path:
    """Save a PIL image as PNG with `params` as JSON in a tEXt chunk."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise PixsigmaError(f"{path}: already exists; expected a new file name (or pass --overwrite)")
    info = _png_info(params)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def png_bytes(image, params: dict | None = None) -> bytes:
    """A PIL image encoded as PNG bytes, with `params` as in `save_png` (the same file content)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_png_info(params))
    return buffer.getvalue()


def generation_params(prompt: str, negative: str, seed: int, info: dict, size: tuple[int, int], model: str,
                      model_hash: str, dtype: str, version: str) -> dict:
    """What a generated PNG records: the call's prompt, negative prompt and seed, the pipeline's
    `info` (steps, sampler, guidance, generated size, guidance interval, step cache), the image's
    (width, height), and the model (name, weights hash, dtype) and pixsigma version."""
    params = {
        "prompt": prompt, "negative": negative, "seed": seed, "steps": info["steps"], "cfg": info["guidance_scale"],
        "sampler": info["sampler"], "size": f"{size[0]}x{size[1]}",
        "generated_size": f"{info['generated_width']}x{info['generated_height']}",
        "model": model, "model_hash": model_hash, "dtype": dtype, "pixsigma": version,
    }
    if "guidance_interval" in info:
        params["guidance_interval"] = ",".join(f"{t:g}" for t in info["guidance_interval"])
    if "step_cache" in info:
        params["step_cache"] = f"{info['step_cache']['mode']}:{info['step_cache']['interval']}"
    return params


def read_png_params(path) -> dict:
    """The parameters stored by `save_png`; PixsigmaError when there are none."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise PixsigmaError(f"{path}: no such file; expected a PNG written by pixsigma generate")
    try:
        with Image.open(path) as im:
            im.load()
            text = dict(getattr(im, "text", {}) or {})
            fmt = im.format
    except (UnidentifiedImageError, OSError) as e:
        raise PixsigmaError(f"{path}: not a readable image ({e}); expected a PNG written by pixsigma generate") from None
    if fmt != "PNG":
        raise PixsigmaError(f"{path}: is a {fmt} image; expected a PNG written by pixsigma generate")
    if PNG_KEY not in text:
        raise PixsigmaError(f"{path}: has no '{PNG_KEY}' metadata; expected a PNG written by pixsigma generate")
    try:
        return json.loads(text[PNG_KEY])
    except json.JSONDecodeError as e:
        raise PixsigmaError(f"{path}: its '{PNG_KEY}' metadata is not valid JSON ({e})") from None
