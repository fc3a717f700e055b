"""GenEval-style prompt-adherence evaluator for toy images.

Detection (:func:`detect_objects`):

1. The background color is the robust mean of the border pixels (median, then the mean of the
   border pixels within 40 RGB units of it).
2. Every pixel is explained as a mix ``bg + alpha * (C_k - bg)`` of the background and a named
   color ``C_k``: for each k the mix weight ``alpha`` is the projection onto the line from the
   background to ``C_k`` and the residual is the distance to that line. A pixel's color is the k
   with the smallest residual among colors with ``0.2 <= alpha <= 1.6``; it is foreground when
   that residual is below ``max_residual`` and its ``alpha >= 0.5``. This assigns anti-aliased or
   blurred edge pixels to the right color (a red-on-white edge pixel is pink-ish in RGB but lies
   exactly on the white-to-red line) and rejects pixels far from every named color.
3. Connected components (8-connected) per color, holes filled, components smaller than
   ``min_area_frac`` of the image dropped.
4. Shape: a soft coverage mask of the component (interior = 1, edge pixels and a 2-pixel ring
   = their mix weight) is compared with each ideal shape (circle = inscribed disc, square = full
   box, triangle = apex up, cross = plus sign). For each shape hypothesis the box size and a
   Gaussian blur are solved from the mask's mass and second moments (blur keeps the mass and
   adds its variance), the ideal shape is drawn in that box and blurred, and the soft IoU with
   the mask is the score; the best score wins. A square with corners rounded by more than about
   a third of its side reads as a circle. The detection center is the center of the fitted box.

Scoring (:func:`score`) reads the detections against the parsed prompt with the GenEval rules
of :func:`pixsigma.toy.scene.score_detections`; :func:`evaluate` aggregates many images into a
report (per-category accuracy, single-object attributes, shape confusion).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from functools import lru_cache
from typing import Iterable

import numpy as np
from PIL import Image
from scipy import ndimage

from pixsigma.errors import PixsigmaError
from pixsigma.io import write_json
from pixsigma.toy import prompts as P
from pixsigma.toy.scene import (
    RELATION_MIN,
    ClauseOutcome,
    Detection,
    Result,
    detections_from_scene,
    inside_shape,
    relation_holds,
    score_detections,
)

__all__ = [
    # detection and scoring
    "Detection", "classify_shape", "detect_objects", "estimate_background", "fit_shape", "score",
    # aggregation and reports
    "evaluate", "evaluate_folder", "format_table", "save_json",
    # the scoring rules, defined in pixsigma.toy.scene and re-exported here
    "RELATION_MIN", "ClauseOutcome", "Result", "detections_from_scene", "relation_holds", "score_detections",
]

logger = logging.getLogger(__name__)

_COLOR_NAMES = tuple(P.ALL_COLORS)  # the training palette and the new-concept colors
_COLOR_RGB = np.array([P.ALL_COLORS[c] for c in _COLOR_NAMES], dtype=np.float32)
_STRUCTURE = np.ones((3, 3), dtype=bool)  # 8-connectivity


# --------------------------------------------------------------------------- detection


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise PixsigmaError(f"image array must be HxWx3 uint8, got shape {arr.shape}")
        arr = arr[..., :3]
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0 + 1e-6:
                arr = np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
            else:
                arr = np.clip(arr, 0, 255).astype(np.uint8)
    else:
        raise PixsigmaError(f"image must be a PIL.Image or an HxWx3 uint8 array, got {type(image).__name__}")
    if arr.shape[0] < 8 or arr.shape[1] < 8:
        raise PixsigmaError(f"image is {arr.shape[1]}x{arr.shape[0]} pixels; expected at least 8x8")
    return arr


def estimate_background(image) -> np.ndarray:
    """Background RGB (float, shape (3,)) estimated from the image border."""
    arr = _as_array(image).astype(np.float32)
    h, w, _ = arr.shape
    b = max(1, min(h, w) // 32)
    border = np.concatenate([
        arr[:b].reshape(-1, 3), arr[-b:].reshape(-1, 3),
        arr[:, :b].reshape(-1, 3), arr[:, -b:].reshape(-1, 3),
    ])
    med = np.median(border, axis=0)
    close = border[np.linalg.norm(border - med, axis=1) < 40.0]
    return close.mean(axis=0) if len(close) else med


@lru_cache(maxsize=None)
def _unit_moments(shape: str) -> tuple[float, float, float, float]:
    """(fill ratio, mean v, var u, var v) of ``shape`` in the unit box."""
    g = (np.arange(600) + 0.5) / 600.0
    u, v = np.meshgrid(g, g)
    m = inside_shape(shape, u, v).astype(np.float64)
    f = m.mean()
    mv = (m * v).sum() / m.sum()
    vu = (m * (u - 0.5) ** 2).sum() / m.sum()
    vv = (m * (v - mv) ** 2).sum() / m.sum()
    return float(f), float(mv), float(vu), float(vv)


def _coverage(shape: str, h: int, w: int, x0: float, y0: float, bw: float, bh: float, ss: int = 4) -> np.ndarray:
    """Pixel coverage (h x w) of ``shape`` drawn in the box (x0, y0, bw, bh), in pixel units."""
    offs = (np.arange(ss) + 0.5) / ss
    xs = (np.arange(w)[:, None] + offs[None, :]).reshape(-1)
    ys = (np.arange(h)[:, None] + offs[None, :]).reshape(-1)
    u, v = np.meshgrid((xs - x0) / bw, (ys - y0) / bh)
    m = inside_shape(shape, u, v).astype(np.float32)
    return m.reshape(h, ss, w, ss).mean(axis=(1, 3))


def fit_shape(mask: np.ndarray, shape: str) -> tuple[float, tuple[float, float, float, float]]:
    """Fit ``shape`` to a soft mask (values 0..1, object coverage) and return (IoU, box).

    The box (x0, y0, w, h, in pixels of ``mask``) and a Gaussian blur are solved from the
    mask's mass and second moments (blur preserves mass and adds its variance), the ideal shape
    is drawn in that box, blurred, and compared with the mask by soft IoU.
    """
    m = np.asarray(mask, dtype=np.float32)
    h, w = m.shape
    mass = float(m.sum())
    if mass <= 0:
        return 0.0, (0.0, 0.0, 0.0, 0.0)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    cx = float((m * xs).sum() / mass)
    cy = float((m * ys).sum() / mass)
    vx = float((m * (xs - cx) ** 2).sum() / mass)
    vy = float((m * (ys - cy) ** 2).sum() / mass)
    f, mv, ku, kv = _unit_moments(shape)
    c = (mass / f) ** 2 * ku * kv
    s = ((vx + vy) - np.sqrt((vx - vy) ** 2 + 4.0 * c)) / 2.0
    s = float(np.clip(s, 0.0, 0.8 * min(vx, vy)))
    bw = np.sqrt(max(vx - s, 1e-6) / ku)
    bh = np.sqrt(max(vy - s, 1e-6) / kv)
    x0, y0 = cx - 0.5 * bw, cy - mv * bh
    t = _coverage(shape, h, w, x0, y0, bw, bh)
    sigma = np.sqrt(max(s - 1.0 / 12.0, 0.0))
    if sigma > 0.15:
        t = ndimage.gaussian_filter(t, sigma, mode="constant")
    iou = float(np.minimum(m, t).sum() / max(np.maximum(m, t).sum(), 1e-6))
    return iou, (float(x0), float(y0), float(bw), float(bh))


def classify_shape(mask: np.ndarray) -> tuple[str, dict[str, float]]:
    """Shape name and per-shape fit IoU of a soft (0..1) or binary object mask."""
    scores = {s: fit_shape(mask, s)[0] for s in P.SHAPES}
    return max(scores, key=scores.get), scores


def _read_colors(arr: np.ndarray, max_residual: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each pixel's reading as a mix of the background and a named color (steps 1 and 2 above).

    Returns ``labels`` (h, w: the color index of foreground pixels, -1 elsewhere), ``owner``
    (h, w: the best color of every pixel with a plausible mix weight, -1 elsewhere) and
    ``alpha`` (h * w, K: each pixel's mix weight toward each color).
    """
    h, w, _ = arr.shape
    bg = estimate_background(arr)
    pix = arr.reshape(-1, 3).astype(np.float32) - bg
    dirs = _COLOR_RGB - bg  # (K, 3)
    norm2 = (dirs ** 2).sum(axis=1)
    usable = norm2 > 30.0 ** 2  # a color equal to the background cannot be detected
    proj = pix @ dirs.T  # (N, K)
    alpha = proj / np.maximum(norm2, 1e-6)
    resid2 = (pix ** 2).sum(axis=1, keepdims=True) - alpha * proj
    # Color identity first (any pixel with a noticeable mix weight), foreground decision second.
    cand = usable[None, :] & (alpha >= 0.2) & (alpha <= 1.6)
    resid2 = np.where(cand, resid2, np.inf)
    best = resid2.argmin(axis=1)
    rows = np.arange(len(best))
    best_r = resid2[rows, best]
    best_a = alpha[rows, best]
    fg = (best_r < max_residual ** 2) & (best_a >= 0.5)
    labels = np.where(fg, best, -1).reshape(h, w)
    owner = np.where(np.isfinite(best_r), best, -1).reshape(h, w)
    return labels, owner, alpha


def _component_detection(component: np.ndarray, k: int, labels: np.ndarray, owner: np.ndarray,
                         alpha_k: np.ndarray, pad: int = 3) -> Detection:
    """The detection of one connected component of color `k` (step 4 above).

    `component` is the component's boolean mask over the whole image; the fit runs in its
    bounding box grown by `pad` pixels.
    """
    h, w = component.shape
    (y0, y1), (x0, x1) = ((int(i.min()), int(i.max()) + 1) for i in np.nonzero(component))
    wy0, wy1 = max(y0 - pad, 0), min(y1 + pad, h)
    wx0, wx1 = max(x0 - pad, 0), min(x1 + pad, w)
    win = ndimage.binary_fill_holes(component[wy0:wy1, wx0:wx1])
    near = ndimage.binary_dilation(win, structure=_STRUCTURE, iterations=2)
    others = labels[wy0:wy1, wx0:wx1] >= 0
    own = owner[wy0:wy1, wx0:wx1]
    keep = win | (near & ~others & ((own == k) | (own < 0)))
    # Soft object coverage: interior pixels count fully (robust to noise and off-color
    # patches), edge pixels and a 2-pixel ring around the object by their mix weight.
    interior = ndimage.binary_erosion(win, structure=_STRUCTURE)
    soft = np.where(interior, 1.0, alpha_k[wy0:wy1, wx0:wx1]) * keep
    fits = {s: fit_shape(soft, s) for s in P.SHAPES}
    scores = {s: v[0] for s, v in fits.items()}
    shape = max(scores, key=scores.get)
    bx, by, bw, bh = fits[shape][1]
    cx = (wx0 + bx + bw / 2.0) / w
    cy = (wy0 + by + bh / 2.0) / h
    return Detection(
        color=_COLOR_NAMES[int(k)], shape=shape,
        center=(float(np.clip(cx, 0.0, 1.0)), float(np.clip(cy, 0.0, 1.0))),
        area=int(win.sum()) / float(h * w), bbox=(x0, y0, x1, y1), shape_scores=scores,
    )


def detect_objects(image, *, max_residual: float = 60.0, min_area_frac: float = 0.01) -> list[Detection]:
    """Detect named-color shapes in an image (PIL.Image or HxWx3 uint8 array), largest first."""
    arr = _as_array(image)
    h, w, _ = arr.shape
    labels, owner, alpha = _read_colors(arr, max_residual)
    min_px = max(3.0, min_area_frac * h * w)
    detections: list[Detection] = []
    for k in np.unique(labels):
        if k < 0:
            continue
        comp, _ = ndimage.label(labels == k, structure=_STRUCTURE)
        alpha_k = np.clip(alpha[:, k], 0.0, 1.0).reshape(h, w)
        for idx, sl in enumerate(ndimage.find_objects(comp)):
            if sl is None or int((comp[sl] == idx + 1).sum()) < min_px:
                continue
            detections.append(_component_detection(comp == idx + 1, k, labels, owner, alpha_k))
    detections.sort(key=lambda d: -d.area)
    return detections


def score(prompt_or_spec, image=None, *, detections: list[Detection] | None = None) -> Result:
    """Score an image against a prompt (string or PromptSpec).

    A prompt outside the vocabulary gives ``Result(scorable=False)``; it never raises for that.
    Pass ``detections`` to reuse a previous :func:`detect_objects` result.
    """
    if isinstance(prompt_or_spec, P.PromptSpec):
        spec, text = prompt_or_spec, P.canonical_prompt(prompt_or_spec)
    elif isinstance(prompt_or_spec, str):
        spec, text = P.parse_prompt(prompt_or_spec), prompt_or_spec
    else:
        raise PixsigmaError(f"prompt must be a string or PromptSpec, got {type(prompt_or_spec).__name__}")
    if spec is None:
        return Result(prompt=text, category="not_scorable", scorable=False)
    if detections is None:
        if image is None:
            raise PixsigmaError("score needs an image or detections; got neither")
        detections = detect_objects(image)
    return score_detections(spec, detections, prompt=text)


# --------------------------------------------------------------------------- aggregation


def _unpack(item) -> tuple[object, str, str | None]:
    if isinstance(item, dict):
        try:
            return item["image"], item["prompt"], item.get("category")
        except KeyError as e:
            raise PixsigmaError(f"evaluation item dict lacks {e}; expected keys image, prompt (and optional category)") from e
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        return item[0], item[1], (item[2] if len(item) == 3 else None)
    raise PixsigmaError(f"evaluation item must be (image, prompt) or (image, prompt, category), got {type(item).__name__}")


class _Tally:
    """Running counts over scored images, turned into a report by :meth:`report`."""

    def __init__(self) -> None:
        self.cats: dict[str, dict] = {}
        self.attrs = {"n": 0, "color": 0, "shape": 0, "position": 0, "all": 0}
        self.confusion = {shape: {read: 0 for read in (*P.SHAPES, "none")} for shape in P.SHAPES}
        self.not_scorable = 0
        self.n_images = 0

    def add(self, res: Result, category: str | None) -> None:
        self.n_images += 1
        if not res.scorable:
            self.not_scorable += 1
            return
        cat = category or res.category
        entry = self.cats.setdefault(cat, {"n": 0, "correct": 0})
        entry["n"] += 1
        entry["correct"] += int(res.correct)
        if cat == "single" and res.all_ok is not None:
            self.attrs["n"] += 1
            self.attrs["color"] += int(bool(res.color_ok))
            self.attrs["shape"] += int(bool(res.shape_ok))
            self.attrs["position"] += int(bool(res.position_ok))
            self.attrs["all"] += int(bool(res.all_ok))
            if res.shape_read is not None:
                self.confusion[res.shape_asked][res.shape_read] += 1

    def report(self) -> dict:
        order = list(P.CATEGORIES) + sorted(c for c in self.cats if c not in P.CATEGORIES)
        categories = {c: {"n": e["n"], "correct": e["correct"], "accuracy": e["correct"] / e["n"]}
                      for c, e in ((c, self.cats[c]) for c in order if c in self.cats)}
        an = self.attrs["n"]
        single = {"n": an, **{k: (self.attrs[k] / an if an else None) for k in ("color", "shape", "position", "all")}}
        accs = [v["accuracy"] for v in categories.values()]
        return {
            "n_images": self.n_images,
            "n_scored": self.n_images - self.not_scorable,
            "not_scorable": self.not_scorable,
            "overall": float(np.mean(accs)) if accs else None,
            "categories": categories,
            "single_attributes": single,
            "shape_confusion": {k: v for k, v in self.confusion.items() if sum(v.values())},
        }


def evaluate(images_and_prompts: Iterable, *, keep_results: bool = False) -> dict:
    """Aggregate scores over ``(image, prompt[, category])`` items (or dicts with those keys).

    Returns a report dict: ``categories`` (per category n / correct / accuracy), ``overall``
    (mean of the category accuracies, as GenEval), ``single_attributes`` (color / shape /
    position / all accuracies over single-object prompts), ``shape_confusion`` (for those
    prompts: asked shape → shape read on the best-matching object → count), ``not_scorable``,
    ``n_images``; with ``keep_results``, ``results`` (every image's :class:`Result` as a dict).
    When ``category`` is not given it is inferred from the prompt.
    """
    tally = _Tally()
    results = []
    for item in images_and_prompts:
        image, prompt, category = _unpack(item)
        res = score(prompt, image)
        tally.add(res, category)
        if keep_results:
            results.append(res)
    report = tally.report()
    if keep_results:
        report["results"] = [_result_dict(r) for r in results]
    logger.info("toy evaluation: %d images, %d not scorable, overall %s", report["n_images"], report["not_scorable"],
                "n/a" if report["overall"] is None else f"{report['overall']:.3f}")
    return report


def _result_dict(r: Result) -> dict:
    d = asdict(r)
    d["detections"] = [{**asdict(x), "cell": x.cell} for x in r.detections]
    return d


def format_table(report: dict) -> str:
    """Plain-text table of a report from :func:`evaluate`."""
    def pct(v):
        return "  n/a" if v is None else f"{100.0 * v:5.1f}%"

    lines = [f"{'category':<14} {'n':>5} {'accuracy':>9}", "-" * 30]
    for cat, e in report.get("categories", {}).items():
        lines.append(f"{cat:<14} {e['n']:>5} {pct(e['accuracy']):>9}")
    lines.append("-" * 30)
    lines.append(f"{'overall':<14} {report.get('n_scored', 0):>5} {pct(report.get('overall')):>9}")
    sa = report.get("single_attributes", {})
    if sa.get("n"):
        lines.append("")
        lines.append(f"single-object prompts (n={sa['n']}): color {pct(sa['color'])}, shape {pct(sa['shape'])}, "
                     f"position {pct(sa['position'])}, all three {pct(sa['all'])}")
    confusion = report.get("shape_confusion")
    if confusion:
        reads = list(next(iter(confusion.values())))
        lines.append("shape read (columns) for the shape asked (rows), single-object prompts:")
        lines.append(f"{'':<10}" + "".join(f"{r:>9}" for r in reads))
        for asked, row in confusion.items():
            lines.append(f"{asked:<10}" + "".join(f"{row[r]:>9}" for r in reads))
    lines.append(f"not scorable: {report.get('not_scorable', 0)} of {report.get('n_images', 0)} images")
    return "\n".join(lines)


def save_json(report: dict, path: str) -> None:
    """Write a report as JSON, atomically (a killed run leaves the old file or the new one)."""
    try:
        write_json(path, report, indent=2)
    except OSError as e:
        raise PixsigmaError(f"cannot write report to {path!r}: {e}; expected a writable path") from e


def evaluate_folder(folder: str, limit: int | None = None) -> dict:
    """Evaluate the images of a dataset written by ``write_dataset`` against their short captions."""
    info_path = os.path.join(folder, "data_info.json")
    try:
        with open(info_path, encoding="utf-8") as f:
            records = json.load(f)
    except (OSError, ValueError) as e:
        raise PixsigmaError(f"cannot read {info_path!r}: {e}; expected a data_info.json written by write_dataset") from e
    records = records[:limit] if limit else records

    def items():
        for r in records:
            with Image.open(os.path.join(folder, r["path"])) as im:
                yield im.convert("RGB"), r["prompt"]

    return evaluate(items())
