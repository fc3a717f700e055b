"""Control images for a served ControlNet: decoded from a request, checked once, named by hash.

The API takes a control image as base64 (a PNG/JPEG/WebP file's bytes) or as a data: URL; the UI
hands over a PIL image. Either becomes the (H, W, 3) uint8 pixels `pixsigma.data.control` reads,
which the pipeline is given as they are, so a served control image generates exactly what
`pipe(..., control_image=<the same picture>)` does. A PNG records the control image by a short
hash of those pixels (a picture re-encoded without loss hashes alike), not the image itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np

from pixsigma.data.control import CONTROL_TYPES, read_control_image
from pixsigma.errors import PixsigmaError
from pixsigma.io import weights_hash
from pixsigma.model.controlnet import check_control_scale

MAX_CONTROL_BYTES = 8 << 20  # an encoded control image; the API's body limit grows by its base64 size
MAX_CONTROL_PIXELS = 4096 * 4096
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
HASH_LENGTH = 12


@dataclass(frozen=True, eq=False)
class ControlInput:
    """A checked control image: its RGB pixels, the preprocessor, the conditioning scale, and the
    short hashes of the pixels and of the server's ControlNet."""

    rgb: np.ndarray  # (H, W, 3) uint8
    kind: str
    scale: float
    image_hash: str
    controlnet_hash: str

    def pipeline_kwargs(self) -> dict:
        return dict(control_image=self.rgb, control_type=self.kind, controlnet_conditioning_scale=self.scale)

    def params(self) -> dict:
        """What a PNG records about the control (the keys `pixsigma generate --control` writes)."""
        return {"control": f"sha256:{self.image_hash}", "control_type": self.kind, "control_scale": self.scale,
                "controlnet": self.controlnet_hash}


def controlnet_hash(pipe) -> str | None:
    """A short hash of the pipeline's ControlNet weights (its own blocks), None without one."""
    net = getattr(pipe, "controlnet", None)
    return weights_hash(net.controlnet_state_dict()) if net is not None else None


def check_control_type(kind: str) -> str:
    if kind not in CONTROL_TYPES:
        raise PixsigmaError(f"unknown control_type {kind!r}; expected one of {', '.join(CONTROL_TYPES)}")
    return kind


def decode_image_data(text: str):
    """A PIL image from base64 or a `data:image/...;base64,` URL; one-line errors otherwise."""
    from PIL import Image, UnidentifiedImageError

    data = text.strip()
    if data.startswith("data:"):
        header, sep, data = data.partition(",")
        if not sep or not header.endswith(";base64"):
            raise PixsigmaError("control_image is a data: URL without ';base64,'; expected "
                                "data:image/png;base64,<base64 bytes>")
    if len(data) > MAX_CONTROL_BYTES * 4 // 3 + 4:
        raise PixsigmaError(f"control_image is larger than {MAX_CONTROL_BYTES} bytes; expected a smaller image")
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise PixsigmaError("control_image is not valid base64; expected a base64-encoded PNG/JPEG "
                            "(or a data: URL)") from None
    undecodable = (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError)
    try:
        image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except undecodable as e:
        raise _undecodable(e) from None
    if image.width * image.height > MAX_CONTROL_PIXELS:  # checked before the pixels are decoded
        raise PixsigmaError(f"control_image is {image.width}x{image.height}; expected at most {MAX_CONTROL_PIXELS} pixels")
    try:
        image.load()
    except undecodable as e:
        raise _undecodable(e) from None
    return image


def _undecodable(e: Exception) -> PixsigmaError:
    return PixsigmaError(f"control_image cannot be decoded ({' '.join(str(e).split())[:120]}); expected a "
                         "base64-encoded PNG/JPEG/WebP image")


def check_control(image, kind: str = "none", scale: float = 1.0, controlnet: str | None = None) -> ControlInput:
    """A control image checked for the server: a PIL image or array, or a string (base64 or a data:
    URL, `decode_image_data`). A ControlNet must be loaded (`controlnet`, its hash), the type
    known, the scale finite, the channels 1 or 3; each checked in that order."""
    if controlnet is None:
        raise PixsigmaError("control_image was given but this server has no ControlNet; expected a server "
                            "started with --controlnet PATH, or no control_image")
    kind = check_control_type(kind)
    scale = check_control_scale(scale)
    if isinstance(image, str):
        image = decode_image_data(image)
    if image is not None and hasattr(image, "mode") and image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")  # other color spaces with 3-4 bands: their RGB picture
    rgb = read_control_image(image)
    if not math.prod(rgb.shape[:2]):
        raise PixsigmaError("control_image has no pixels; expected a non-empty image")
    digest = hashlib.sha256(f"{rgb.shape}".encode() + rgb.tobytes()).hexdigest()[:HASH_LENGTH]
    return ControlInput(rgb=rgb, kind=kind, scale=scale, image_hash=digest, controlnet_hash=controlnet)
