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

Scoring (:func:`score`) follows GenEval: "a"/"an" means at least one object of the named class
(color and/or shape, plus the grid cell when one is named); a number word means exactly that
many; distinct clauses need distinct objects; "A left of B" holds when B's center is more than
``RELATION_MIN`` (fraction of the image width) to the right of A's (same for the other
relations, y grows downwards). An image is correct only when every clause holds.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Callable, Iterable

import numpy as np
from PIL import Image
from scipy import ndimage

from pixsigma.errors import PixsigmaError
from pixsigma.toy import prompts as P

logger = logging.getLogger(__name__)

RELATION_MIN = 0.05
_COLOR_RGB = np.array([P.COLORS[c] for c in P.COLOR_NAMES], dtype=np.float32)
_MAX_DETECTIONS = 16


@dataclass
class Detection:
    color: str
    shape: str
    center: tuple[float, float]  # normalized (x, y), y down
    area: float  # fraction of the image covered
    bbox: tuple[int, int, int, int]  # pixel x0, y0, x1, y1 (x1, y1 exclusive)
    shape_scores: dict[str, float] = field(default_factory=dict)

    @property
    def cell(self) -> str:
        return P.cell_of(*self.center)


@dataclass
class ClauseOutcome:
    clause: str
    ok: bool


@dataclass
class Result:
    prompt: str
    category: str
    scorable: bool
    correct: bool = False
    clauses: list[ClauseOutcome] = field(default_factory=list)
    color_ok: bool | None = None
    shape_ok: bool | None = None
    position_ok: bool | None = None
    all_ok: bool | None = None
    # single-object prompts naming a shape: that shape and the one read on the best-matching
    # detection ("none" when nothing was detected); they feed the report's shape confusion
    shape_asked: str | None = None
    shape_read: str | None = None
    detections: list[Detection] = field(default_factory=list)


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


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether unit-box coordinates (u right, v down, both in [0, 1]) are inside ``shape``."""
    box = (u >= 0.0) & (u <= 1.0) & (v >= 0.0) & (v <= 1.0)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "square":
        return box
    if shape == "triangle":
        return box & (np.abs(u - 0.5) <= v / 2.0)
    if shape == "cross":
        from pixsigma.toy.render import CROSS_ARM

        half = CROSS_ARM / 2.0
        return box & ((np.abs(u - 0.5) <= half) | (np.abs(v - 0.5) <= half))
    raise PixsigmaError(f"unknown shape {shape!r}; expected one of {', '.join(P.SHAPES)}")


@lru_cache(maxsize=None)
def _unit_moments(shape: str) -> tuple[float, float, float, float]:
    """(fill ratio, mean v, var u, var v) of ``shape`` in the unit box."""
    g = (np.arange(600) + 0.5) / 600.0
    u, v = np.meshgrid(g, g)
    m = _inside(shape, u, v).astype(np.float64)
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
    m = _inside(shape, u, v).astype(np.float32)
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


def detect_objects(image, *, max_residual: float = 60.0, min_area_frac: float = 0.01) -> list[Detection]:
    """Detect named-color shapes in an image (PIL.Image or HxWx3 uint8 array)."""
    arr = _as_array(image)
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

    min_px = max(3.0, min_area_frac * h * w)
    structure = np.ones((3, 3), dtype=bool)
    pad = 3
    detections: list[Detection] = []
    for k in np.unique(labels):
        if k < 0:
            continue
        comp, n = ndimage.label(labels == k, structure=structure)
        alpha_k = np.clip(alpha[:, k], 0.0, 1.0).reshape(h, w)
        for idx, sl in enumerate(ndimage.find_objects(comp)):
            if sl is None:
                continue
            y0, y1 = sl[0].start, sl[0].stop
            x0, x1 = sl[1].start, sl[1].stop
            if int((comp[sl] == idx + 1).sum()) < min_px:
                continue
            wy0, wy1 = max(y0 - pad, 0), min(y1 + pad, h)
            wx0, wx1 = max(x0 - pad, 0), min(x1 + pad, w)
            win = comp[wy0:wy1, wx0:wx1] == idx + 1
            win = ndimage.binary_fill_holes(win)
            npx = int(win.sum())
            near = ndimage.binary_dilation(win, structure=structure, iterations=2)
            others = labels[wy0:wy1, wx0:wx1] >= 0
            own = owner[wy0:wy1, wx0:wx1]
            keep = win | (near & ~others & ((own == k) | (own < 0)))
            # Soft object coverage: interior pixels count fully (robust to noise and off-color
            # patches), edge pixels and a 2-pixel ring around the object by their mix weight.
            interior = ndimage.binary_erosion(win, structure=structure)
            soft = np.where(interior, 1.0, alpha_k[wy0:wy1, wx0:wx1]) * keep
            fits = {s: fit_shape(soft, s) for s in P.SHAPES}
            scores = {s: v[0] for s, v in fits.items()}
            shape = max(scores, key=scores.get)
            bx, by, bw, bh = fits[shape][1]
            cx = (wx0 + bx + bw / 2.0) / w
            cy = (wy0 + by + bh / 2.0) / h
            detections.append(Detection(
                color=P.COLOR_NAMES[int(k)], shape=shape,
                center=(float(np.clip(cx, 0.0, 1.0)), float(np.clip(cy, 0.0, 1.0))),
                area=npx / float(h * w), bbox=(int(x0), int(y0), int(x1), int(y1)),
                shape_scores=scores,
            ))
    detections.sort(key=lambda d: -d.area)
    return detections


def detections_from_scene(scene) -> list[Detection]:
    """Ground-truth detections of a Scene (or a scene dict from data_info.json)."""
    from pixsigma.toy.render import Scene

    if isinstance(scene, dict):
        scene = Scene.from_dict(scene)
    out = []
    for o in scene.objects:
        out.append(Detection(color=o.color, shape=o.shape, center=(o.x, o.y), area=o.size * o.size,
                             bbox=(-1, -1, -1, -1), shape_scores={o.shape: 1.0}))
    return out


# --------------------------------------------------------------------------- scoring


def _matches(clause: P.ObjectClause, d: Detection) -> bool:
    if clause.color is not None and d.color != clause.color:
        return False
    if clause.shape is not None and d.shape != clause.shape:
        return False
    if clause.position is not None and d.cell != clause.position:
        return False
    return True


def relation_holds(relation: str, a: Detection, b: Detection) -> bool:
    """Whether detection ``a`` is ``relation`` detection ``b`` (centers, y down)."""
    dx = b.center[0] - a.center[0]
    dy = b.center[1] - a.center[1]
    if relation == "left of":
        return dx > RELATION_MIN
    if relation == "right of":
        return -dx > RELATION_MIN
    if relation == "above":
        return dy > RELATION_MIN
    if relation == "below":
        return -dy > RELATION_MIN
    raise PixsigmaError(f"unknown relation {relation!r}; expected one of {', '.join(P.RELATIONS)}")


def _joint_ok(spec: P.PromptSpec, dets: list[Detection], cands: list[list[int]]) -> bool:
    options = []
    for clause, cand in zip(spec.objects, cands):
        if clause.exact:
            if len(cand) != clause.count:
                return False
            options.append([tuple(cand)])
        else:
            if len(cand) < clause.count:
                return False
            options.append(list(itertools.combinations(cand, clause.count)))

    chosen: list[tuple[int, ...]] = []

    def rec(i: int, used: frozenset) -> bool:
        if i == len(options):
            return all(
                any(relation_holds(r.relation, dets[x], dets[y]) for x in chosen[r.a] for y in chosen[r.b])
                for r in spec.relations
            )
        for opt in options[i]:
            if used.intersection(opt):
                continue
            chosen.append(opt)
            if rec(i + 1, used.union(opt)):
                return True
            chosen.pop()
        return False

    return rec(0, frozenset())


def score_detections(spec: P.PromptSpec, detections: list[Detection], prompt: str = "") -> Result:
    """Score a parsed prompt against a list of detections."""
    dets = list(detections)[:_MAX_DETECTIONS]
    cands = [[i for i, d in enumerate(dets) if _matches(c, d)] for c in spec.objects]
    outcomes = []
    for clause, cand in zip(spec.objects, cands):
        ok = len(cand) == clause.count if clause.exact else len(cand) >= clause.count
        outcomes.append(ClauseOutcome(clause.describe(), ok))
    for r in spec.relations:
        ok = any(relation_holds(r.relation, dets[x], dets[y]) for x in cands[r.a] for y in cands[r.b] if x != y)
        a, b = spec.objects[r.a], spec.objects[r.b]
        desc = f"{a.color or ''} {a.shape or 'object'} {r.relation} {b.color or ''} {b.shape or 'object'}"
        outcomes.append(ClauseOutcome(" ".join(desc.split()), ok))
    correct = all(o.ok for o in outcomes) and _joint_ok(spec, dets, cands)
    res = Result(prompt=prompt or P.canonical_prompt(spec), category=P.infer_category(spec), scorable=True,
                 correct=correct, clauses=outcomes, detections=dets)
    if len(spec.objects) == 1 and not spec.relations and spec.objects[0].count == 1 and not spec.objects[0].exact:
        c = spec.objects[0]

        def attrs(d: Detection) -> tuple[bool, bool, bool]:
            return (c.color is None or d.color == c.color, c.shape is None or d.shape == c.shape,
                    c.position is None or d.cell == c.position)

        if dets:
            best = max(dets, key=lambda d: (sum(attrs(d)), d.area))
            res.color_ok, res.shape_ok, res.position_ok = attrs(best)
        else:
            res.color_ok = res.shape_ok = res.position_ok = False
        if c.shape is not None:
            res.shape_asked, res.shape_read = c.shape, (best.shape if dets else "none")
        if c.position is None:
            res.position_ok = None
        res.all_ok = correct
    return res


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


def evaluate(images_and_prompts: Iterable, *, keep_results: bool = False) -> dict:
    """Aggregate scores over ``(image, prompt[, category])`` items (or dicts with those keys).

    Returns a report dict: ``categories`` (per category n / correct / accuracy), ``overall``
    (mean of the category accuracies, as GenEval), ``single_attributes`` (color / shape /
    position / all accuracies over single-object prompts), ``shape_confusion`` (for those
    prompts: asked shape → shape read on the best-matching object → count), ``not_scorable``,
    ``n_images``.
    When ``category`` is not given it is inferred from the prompt.
    """
    cats: dict[str, dict] = {}
    attrs = {"n": 0, "color": 0, "shape": 0, "position": 0, "all": 0}
    confusion = {shape: {read: 0 for read in (*P.SHAPES, "none")} for shape in P.SHAPES}
    not_scorable = 0
    n_images = 0
    results = []
    for item in images_and_prompts:
        image, prompt, category = _unpack(item)
        n_images += 1
        res = score(prompt, image)
        if keep_results:
            results.append(res)
        if not res.scorable:
            not_scorable += 1
            continue
        cat = category or res.category
        entry = cats.setdefault(cat, {"n": 0, "correct": 0})
        entry["n"] += 1
        entry["correct"] += int(res.correct)
        if cat == "single" and res.all_ok is not None:
            attrs["n"] += 1
            attrs["color"] += int(bool(res.color_ok))
            attrs["shape"] += int(bool(res.shape_ok))
            attrs["position"] += int(bool(res.position_ok))
            attrs["all"] += int(bool(res.all_ok))
            if res.shape_read is not None:
                confusion[res.shape_asked][res.shape_read] += 1
    order = list(P.CATEGORIES) + sorted(c for c in cats if c not in P.CATEGORIES)
    categories = {}
    for c in order:
        if c in cats:
            e = cats[c]
            categories[c] = {"n": e["n"], "correct": e["correct"], "accuracy": e["correct"] / e["n"]}
    an = attrs["n"]
    single_attributes = {"n": an, **{k: (attrs[k] / an if an else None) for k in ("color", "shape", "position", "all")}}
    accs = [v["accuracy"] for v in categories.values()]
    report = {
        "n_images": n_images,
        "n_scored": n_images - not_scorable,
        "not_scorable": not_scorable,
        "overall": float(np.mean(accs)) if accs else None,
        "categories": categories,
        "single_attributes": single_attributes,
        "shape_confusion": {k: v for k, v in confusion.items() if sum(v.values())},
    }
    if keep_results:
        report["results"] = [_result_dict(r) for r in results]
    logger.info("toy evaluation: %d images, %d not scorable, overall %s", n_images, not_scorable,
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
    """Write a report as JSON atomically (temp file + os.replace)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".json")
    except OSError as e:
        raise PixsigmaError(f"cannot write report to {path!r}: {e}; expected a writable path") from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def clean_render_accuracy(
    n: int = 300,
    seed: int = 0,
    size: int = 64,
    transform: Callable | None = None,
    batch_transform: Callable | None = None,
) -> dict:
    """Evaluator accuracy on reference renders: an upper bound / self-check of the evaluator.

    Half of the ``n`` images are renders of held-out prompts (``scene_from_prompt``), half are
    generator scenes scored against their own short captions. ``transform`` (PIL image -> PIL
    image or HxWx3 uint8 array) is applied to each image, ``batch_transform`` (list -> list) to
    all of them at once (e.g. a VAE encode/decode round trip). Returns an :func:`evaluate` report.
    """
    from pixsigma.toy.render import render, sample_scene, scene_from_prompt

    if not isinstance(n, int) or n < 12:
        raise PixsigmaError(f"clean_render_accuracy needs n >= 12 images, got {n!r}")
    n_held = n // 2
    items = []
    for i, item in enumerate(P.heldout_prompts(n_held, seed=seed)):
        rng = np.random.default_rng([seed, 1, i])
        scene = scene_from_prompt(item.prompt, rng)
        items.append((render(scene, size), item.prompt, item.category))
    for i in range(n - n_held):
        rng = np.random.default_rng([seed, 2, i])
        scene = sample_scene(rng)
        items.append((render(scene, size), scene.short_caption, None))
    images = [im for im, _, _ in items]
    if transform is not None:
        images = [transform(im) for im in images]
    if batch_transform is not None:
        images = list(batch_transform(images))
        if len(images) != len(items):
            raise PixsigmaError(f"batch_transform returned {len(images)} images for {len(items)} inputs")
    return evaluate((im, p, c) for im, (_, p, c) in zip(images, items))
