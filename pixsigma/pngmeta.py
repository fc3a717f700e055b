"""Generation parameters stored in PNG files: a tEXt chunk with key "pixsigma" holding JSON.

`save_png` writes atomically (through `pixsigma.io.atomic_write`) and refuses to replace an
existing file unless overwrite=True; `read_png_params` returns the dict back.
"""

from __future__ import annotations

import json
from pathlib import Path

from pixsigma.errors import PixsigmaError
from pixsigma.io import atomic_write

PNG_KEY = "pixsigma"


def save_png(image, path, params: dict | None = None, overwrite: bool = False) -> Path:
    """Save a PIL image as PNG with `params` as JSON in a tEXt chunk."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    if path.exists() and not overwrite:
        raise PixsigmaError(f"{path}: already exists; expected a new file name (or pass --overwrite)")
    info = PngInfo()
    if params is not None:
        info.add_text(PNG_KEY, json.dumps(params, ensure_ascii=False, sort_keys=True))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


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
