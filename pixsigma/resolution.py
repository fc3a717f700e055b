"""Resolution handling: aspect-ratio bins, size parsing, inline prompt options, resize + crop.

A request (height, width) is mapped to the nearest aspect-ratio bin of the model's base
resolution, generated there, then resized and center-cropped to exactly the request (the
released PixArt pipelines do the same). The bin tables come from `assets/aspect_ratios.json`
(ratio = height / width → [height, width] in pixels); a model whose pixel size is not one of the
tables uses the closest table scaled proportionally, sides rounded to multiples of the latent
patch in pixels.
"""

from __future__ import annotations

import json
import logging
import math
import re
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from pixsigma.errors import PixsigmaError

log = logging.getLogger(__name__)

MAX_SIDE = 8192
ASSET = Path(__file__).resolve().parent / "assets" / "aspect_ratios.json"


@lru_cache(maxsize=1)
def _tables() -> dict[int, dict[str, tuple[int, int]]]:
    data = json.loads(ASSET.read_text())
    return {int(k): {r: (int(hw[0]), int(hw[1])) for r, hw in v.items()} for k, v in data["bins"].items()}


def table_sizes() -> list[int]:
    """The base resolutions that have a released table (256, 512, 1024, 2048, 2880, 4096)."""
    return sorted(_tables())


def aspect_ratio_bins(resolution: int, multiple: int = 16) -> dict[str, tuple[int, int]]:
    """Bins for a model generating `resolution`-pixel images: ratio (h/w) → (height, width).

    A released table is returned as is; otherwise the closest table (in log scale) is scaled
    by resolution / table size, each side rounded to a multiple of `multiple` (the latent patch
    in pixels: patch_size × VAE factor), never below one multiple.
    """
    if resolution <= 0:
        raise PixsigmaError(f"model resolution must be positive, got {resolution}")
    tables = _tables()
    if resolution in tables:
        return dict(tables[resolution])
    base = min(tables, key=lambda s: abs(math.log(s / resolution)))
    scale = resolution / base
    out = {}
    for ratio, (h, w) in tables[base].items():
        out[ratio] = (max(multiple, round(h * scale / multiple) * multiple), max(multiple, round(w * scale / multiple) * multiple))
    return out


def nearest_bin(height: int, width: int, bins: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """The bin whose ratio (h/w) is closest to height / width."""
    ar = height / width
    key = min(bins, key=lambda r: abs(float(r) - ar))
    return bins[key]


def check_side(value, name: str = "size") -> int:
    """An image side as int in 1..8192, or a one-line PixsigmaError."""
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError
            value = int(value)
        v = int(str(value).strip()) if not isinstance(value, int) else value
    except (TypeError, ValueError):
        raise PixsigmaError(f"{name} {value!r} is not a whole number of pixels; expected an integer in 1..{MAX_SIDE}") from None
    if v <= 0 or v > MAX_SIDE:
        raise PixsigmaError(f"{name} {v} is out of range; expected 1..{MAX_SIDE} pixels")
    return v


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' (width x height) → (height, width)."""
    m = re.fullmatch(r"\s*([^xX×*:]+)\s*[xX×*]\s*([^xX×*:]+)\s*", str(text))
    if not m:
        raise PixsigmaError(f"size {text!r} is not WIDTHxHEIGHT; expected e.g. 1024x768")
    width = check_side(m.group(1), "width")
    height = check_side(m.group(2), "height")
    return height, width


def parse_ratio(text: str) -> float:
    """'16:9' → 16/9 (the first number over the second, as the official h:w prompt syntax)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*", str(text))
    if not m or float(m.group(1)) <= 0 or float(m.group(2)) <= 0:
        raise PixsigmaError(f"aspect ratio {text!r} is not H:W with positive numbers; expected e.g. 16:9")
    return float(m.group(1)) / float(m.group(2))


def size_for_ratio(ratio_hw: float, resolution: int) -> tuple[int, int]:
    """(height, width) with height / width = ratio and about resolution² pixels."""
    if not 1 / 16 <= ratio_hw <= 16:
        raise PixsigmaError(f"aspect ratio {ratio_hw:.3g} (h/w) is too extreme; expected between 1:16 and 16:1")
    h = resolution * math.sqrt(ratio_hw)
    w = resolution / math.sqrt(ratio_hw)
    return check_side(max(1, round(h)), "height"), check_side(max(1, round(w)), "width")


_OPTION = re.compile(r"--(aspect_ratio|ar|hw)\s+(\S+)")


def parse_prompt_options(prompt: str) -> tuple[str, dict]:
    """Strip the official inline options from a prompt.

    "a cat --ar 16:9" → ("a cat", {"ar": 16/9}); "--hw 1024:768" → {"hw": (1024, 768)} (height,
    width). As in the official code, `--ar h:w` is height:width and everything from the first
    option on is removed from the prompt text.
    """
    options: dict = {}
    for m in _OPTION.finditer(prompt):
        key, value = m.group(1), m.group(2)
        if key in ("ar", "aspect_ratio"):
            options.setdefault("ar", parse_ratio(value))
        else:
            parts = value.split(":")
            if len(parts) != 2:
                raise PixsigmaError(f"--hw {value!r} is not HEIGHT:WIDTH; expected e.g. 1024:768")
            options.setdefault("hw", (check_side(parts[0], "height"), check_side(parts[1], "width")))
    m = re.search(r"--(aspect_ratio|ar|hw)\b", prompt)
    clean = prompt[: m.start()] if m else prompt
    return clean.strip(), options


def resize_and_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize (B, C, H, W) images to cover height × width (bilinear), then center-crop."""
    h0, w0 = images.shape[-2:]
    if (h0, w0) == (height, width):
        return images
    scale = max(height / h0, width / w0)
    rh, rw = max(height, round(h0 * scale)), max(width, round(w0 * scale))
    if (rh, rw) != (h0, w0):
        images = F.interpolate(images, size=(rh, rw), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (rh - height) // 2, (rw - width) // 2
    return images[..., top : top + height, left : left + width]


def plan_size(height: int, width: int, resolution: int, multiple: int, binning: bool = True) -> tuple[int, int]:
    """The (height, width) to generate at for a request: its bin, or (without binning) the
    request rounded up to a multiple of the latent patch in pixels."""
    height, width = check_side(height, "height"), check_side(width, "width")
    if binning:
        return nearest_bin(height, width, aspect_ratio_bins(resolution, multiple))
    return math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple
