"""Control images for a ControlNet: read, preprocess, and fit to the generation size.

Kinds (`CONTROL_TYPES`), none of which needs downloaded weights:
- "none": the image as the user gives it (an edge map, a color-coded segmentation, ...);
- "canny": Canny edges of the image (OpenCV), white on black;
- "mask": the image as a grayscale mask (white = object), e.g. a segmentation or object mask.

A control image is returned as a (1, 3, H, W) float tensor in [0, 1], resized to cover the
generation size and center-cropped (`pixsigma.resolution.resize_and_crop`, what the pipeline
does to its output), ready for the VAE's `encode`.

On the toy world the renderer's exact maps serve as control: `mask_edges(render_mask(scene))`
gives the objects' outlines, `render_mask(scene)` the object mask (pixsigma.toy.render).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pixsigma.errors import PixsigmaError
from pixsigma.resolution import resize_and_crop

CONTROL_TYPES = ("none", "canny", "mask")
CANNY_THRESHOLDS = (100, 200)  # OpenCV's low / high hysteresis thresholds on 8-bit gray


def read_control_image(source) -> np.ndarray:
    """A control image as an (H, W, 3) uint8 array, from a path, a PIL image, or an (H, W[, C]) /
    (C, H, W) array or tensor (uint8 0..255, or float 0..1). One or three channels are accepted;
    four only with an opaque alpha (dropped)."""
    from PIL import Image, UnidentifiedImageError

    name = "control image"
    if isinstance(source, (str, Path)):
        name = str(source)
        try:
            with Image.open(source) as im:
                im.load()
                source = im.copy()
        except (OSError, UnidentifiedImageError) as e:
            raise PixsigmaError(f"{name}: cannot read the control image ({' '.join(str(e).split())}); "
                                "expected a PNG/JPEG/WebP/BMP file") from None
    if isinstance(source, Image.Image):
        if source.mode in ("P", "1", "I;16", "I", "F"):
            source = source.convert("RGBA" if "transparency" in source.info else "L")
        arr = np.asarray(source)
    elif torch.is_tensor(source):
        arr = source.detach().cpu().numpy()
    else:
        arr = np.asarray(source)
    return _to_rgb8(arr, name)


def _to_rgb8(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[0] <= 4 < arr.shape[-1]:
        arr = arr.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if arr.ndim == 2:
        arr = arr[..., None]
    channels = arr.shape[-1] if arr.ndim == 3 else None
    if channels == 4 and _opaque(arr[..., 3]):
        arr, channels = arr[..., :3], 3
    if channels not in (1, 3):
        shape = tuple(arr.shape)
        raise PixsigmaError(f"{name}: the control image has shape {shape} ({channels} channels); expected 1 (grayscale) "
                            "or 3 (RGB) channels")
    if arr.dtype != np.uint8:
        arr = np.clip(np.asarray(arr, dtype=np.float64) * (255.0 if arr.max(initial=0) <= 1.0 else 1.0), 0, 255)
        arr = arr.round().astype(np.uint8)
    return np.repeat(arr, 3, axis=-1) if channels == 1 else np.ascontiguousarray(arr)


def _opaque(alpha: np.ndarray) -> bool:
    return bool((alpha == (255 if alpha.dtype == np.uint8 else 1)).all())


def canny(rgb: np.ndarray, low: int = CANNY_THRESHOLDS[0], high: int = CANNY_THRESHOLDS[1]) -> np.ndarray:
    """Canny edges of an (H, W, 3) uint8 image: (H, W, 3) uint8, 255 on edges, 0 elsewhere."""
    import cv2

    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, int(low), int(high))
    return np.repeat(edges[..., None], 3, axis=-1)


def grayscale_mask(rgb: np.ndarray) -> np.ndarray:
    """The image as a grayscale mask replicated over three channels (ITU-R 601 luma)."""
    gray = (rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).round().astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def mask_edges(mask, threshold: int = 128) -> np.ndarray:
    """The exact outline of a grayscale mask (a PIL image or an (H, W) array): pixels inside the
    mask (>= threshold) with a 4-neighbour outside it, 255 there and 0 elsewhere, (H, W, 3) uint8."""
    inside = np.asarray(mask.convert("L") if hasattr(mask, "convert") else mask) >= threshold
    pad = np.pad(inside, 1, mode="constant", constant_values=False)
    interior = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    edge = (inside & ~interior).astype(np.uint8) * 255
    return np.repeat(edge[..., None], 3, axis=-1)


def preprocess(rgb: np.ndarray, kind: str = "none") -> np.ndarray:
    """Apply a built-in preprocessor (`CONTROL_TYPES`) to an (H, W, 3) uint8 image."""
    if kind == "none":
        return rgb
    if kind == "canny":
        return canny(rgb)
    if kind == "mask":
        return grayscale_mask(rgb)
    raise PixsigmaError(f"unknown control type {kind!r}; expected one of {', '.join(CONTROL_TYPES)}")


def control_tensor(source, height: int, width: int, kind: str = "none") -> torch.Tensor:
    """Read, preprocess and fit a control image to height × width: (1, 3, H, W) float in [0, 1]."""
    rgb = preprocess(read_control_image(source), kind)
    image = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255.0  # (1, 3, h, w)
    return resize_and_crop(image, height, width).clamp_(0, 1)
