"""Procedural captioned images: flat shapes on a plain background.

A :class:`Scene` holds 1 to 3 objects (shape, color, normalized center, normalized side length),
a background and two captions (short and long). :func:`sample_scene` draws a random scene of one
of the kinds in :data:`SCENE_KINDS`, :func:`scene_from_prompt` builds a scene that satisfies a
prompt, :func:`render` draws a scene anti-aliased (supersampled, box-filtered), :func:`generate`
streams ``(image, short_caption, long_caption, scene)`` deterministically from a seed, and
:func:`write_dataset` writes PNG files plus a PixArt-style ``data_info.json``.

The scene model, the shapes' geometry (sizes, margins, the cross's arm width) and the rules for
when objects satisfy a prompt live in :mod:`pixsigma.toy.scene`; the names are re-exported here.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from pixsigma.errors import PixsigmaError
from pixsigma.io import atomic_write, write_json
from pixsigma.toy import prompts as P
from pixsigma.toy.scene import (
    CELL_MARGIN,
    CROSS_ARM,
    EDGE_PAD,
    GAP,
    SIZE_RANGES,
    Scene,
    SceneObject,
    detections_from_scene,
    score_detections,
)

logger = logging.getLogger(__name__)

RELATION_MIN_GEN = 0.15  # generated relations have at least this center offset along their axis

SCENE_KINDS: tuple[str, ...] = ("single", "two_objects", "color_attr", "position", "counting", "multi")
_KIND_WEIGHTS = np.array([0.3, 0.14, 0.14, 0.16, 0.16, 0.10])
_SIZE_PHRASE = {"small": "small", "medium": "medium-sized", "large": "large"}
_MIN_IMAGE_SIZE = 16


# --------------------------------------------------------------------------- rendering


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < _MIN_IMAGE_SIZE:
        raise PixsigmaError(f"image size must be an integer >= {_MIN_IMAGE_SIZE} (square side in pixels), got {size!r}")
    return int(size)


def _validate_scene(scene: Scene) -> None:
    if scene.background not in P.BACKGROUNDS:
        raise PixsigmaError(f"unknown background {scene.background!r}; expected one of {', '.join(P.BACKGROUND_NAMES)}")
    for o in scene.objects:
        if o.shape not in P.SHAPES:
            raise PixsigmaError(f"unknown shape {o.shape!r}; expected one of {', '.join(P.SHAPES)}")
        if o.color not in P.ALL_COLORS:
            raise PixsigmaError(f"unknown color {o.color!r}; expected one of {', '.join(P.ALL_COLORS)}")
        if not (0.0 < o.size <= 1.0):
            raise PixsigmaError(f"object size {o.size!r} out of range; expected a fraction of the image side in (0, 1]")


def _draw_objects(img: Image.Image, scene: Scene, fill_of) -> None:
    """Draw the scene's objects onto `img` (the supersampled canvas), each in `fill_of(object)`."""
    draw = ImageDraw.Draw(img)
    big = img.width
    for o in scene.objects:
        fill = fill_of(o)
        half = o.size * big / 2.0
        cx, cy = o.x * big, o.y * big
        # PIL treats the second corner as inclusive: subtract one supersampled pixel.
        x0, y0, x1, y1 = cx - half, cy - half, cx + half - 1, cy + half - 1
        if o.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif o.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx - 0.5, y0), (x1, y1), (x0, y1)], fill=fill)
        elif o.shape == "cross":
            arm = CROSS_ARM * o.size * big / 2.0
            draw.rectangle([cx - arm, y0, cx + arm - 1, y1], fill=fill)
            draw.rectangle([x0, cy - arm, x1, cy + arm - 1], fill=fill)


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw a scene as an RGB image of ``size x size`` pixels (anti-aliased by supersampling)."""
    size = _check_size(size)
    _validate_scene(scene)
    ss = max(int(supersample), 1)
    img = Image.new("RGB", (size * ss, size * ss), P.BACKGROUNDS[scene.background])
    _draw_objects(img, scene, lambda o: P.ALL_COLORS[o.color])
    return img.resize((size, size), Image.BOX) if ss > 1 else img


def render_mask(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """The scene's object mask as an 8-bit grayscale image aligned with `render`: the fraction of
    each pixel the objects cover (255 = inside an object, 0 = background)."""
    size = _check_size(size)
    _validate_scene(scene)
    ss = max(int(supersample), 1)
    img = Image.new("L", (size * ss, size * ss), 0)
    _draw_objects(img, scene, lambda o: 255)
    return img.resize((size, size), Image.BOX) if ss > 1 else img


# --------------------------------------------------------------------------- placement


def _axis_range(index: int, half: float) -> tuple[float, float]:
    lo = max(index / 3.0 + CELL_MARGIN, half + EDGE_PAD)
    hi = min((index + 1) / 3.0 - CELL_MARGIN, 1.0 - half - EDGE_PAD)
    return lo, hi


def _separated(a: SceneObject, b: SceneObject) -> bool:
    sep_x = abs(a.x - b.x) - (a.size + b.size) / 2.0
    sep_y = abs(a.y - b.y) - (a.size + b.size) / 2.0
    return max(sep_x, sep_y) >= GAP


def _relation_offset(rel: str, a: SceneObject, b: SceneObject) -> tuple[float, float]:
    """(offset along the relation axis, offset across) of a relative to b; along > 0 means it holds."""
    dx, dy = b.x - a.x, b.y - a.y
    if rel == "left of":
        return dx, abs(dy)
    if rel == "right of":
        return -dx, abs(dy)
    if rel == "above":
        return dy, abs(dx)
    if rel == "below":
        return -dy, abs(dx)
    raise PixsigmaError(f"unknown relation {rel!r}; expected one of {', '.join(P.RELATIONS)}")


def _cells_for_relation(rng: np.random.Generator, rel: str) -> tuple[str, str]:
    """Two grid cells (a, b) for which "a rel b" is unambiguous (dominant axis)."""
    pairs = []
    for ca in P.POSITIONS:
        ra, ka = P.cell_index(ca)
        for cb in P.POSITIONS:
            rb, kb = P.cell_index(cb)
            along = {"left of": kb - ka, "right of": ka - kb, "above": rb - ra, "below": ra - rb}[rel]
            across = abs(ra - rb) if rel in ("left of", "right of") else abs(ka - kb)
            if along >= 1 and across <= along:
                pairs.append((ca, cb))
    return pairs[int(rng.integers(len(pairs)))]


def _place(
    rng: np.random.Generator,
    items: list[dict],
    relations: list[tuple[int, str, int]],
    tries: int = 200,
) -> list[SceneObject] | None:
    """Place objects: items are dicts with shape, color, size_name and optional cell.

    Returns None when no valid placement was found in ``tries`` attempts.
    """
    for _ in range(tries):
        cells = [it.get("cell") for it in items]
        for a, rel, b in relations:
            if cells[a] is None and cells[b] is None:
                cells[a], cells[b] = _cells_for_relation(rng, rel)
        used = {c for c in cells if c is not None}
        for i, c in enumerate(cells):
            if c is None:
                free = [p for p in P.POSITIONS if p not in used] or list(P.POSITIONS)
                cells[i] = free[int(rng.integers(len(free)))]
                used.add(cells[i])
        objects: list[SceneObject] = []
        ok = True
        for it, cell in zip(items, cells):
            lo_s, hi_s = SIZE_RANGES[it["size_name"]]
            s = float(rng.uniform(lo_s, hi_s))
            row, col = P.cell_index(cell)
            xlo, xhi = _axis_range(col, s / 2.0)
            ylo, yhi = _axis_range(row, s / 2.0)
            if xlo > xhi or ylo > yhi:
                ok = False
                break
            obj = SceneObject(it["shape"], it["color"], float(rng.uniform(xlo, xhi)),
                              float(rng.uniform(ylo, yhi)), s, it["size_name"])
            if any(not _separated(obj, o) for o in objects):
                ok = False
                break
            objects.append(obj)
        if not ok:
            continue
        if all(_relation_offset(r, objects[a], objects[b])[0] >= RELATION_MIN_GEN
               and _relation_offset(r, objects[a], objects[b])[0] >= _relation_offset(r, objects[a], objects[b])[1]
               for a, r, b in relations):
            return objects
    return None


# --------------------------------------------------------------------------- captions


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _long_caption(rng: np.random.Generator, scene: Scene) -> str:
    objs = scene.objects
    bg = scene.background
    n = len(objs)
    template = int(rng.integers(3))
    seen: dict[tuple[str, str], int] = {}
    leads = []
    for o in objs:
        k = seen.get((o.color, o.shape), 0)
        seen[(o.color, o.shape)] = k + 1
        leads.append(k)
    count_words = {1: "a single object", 2: "two objects", 3: "three objects"}

    def obj_sentence(i: int, o: SceneObject) -> str:
        desc = f"{_SIZE_PHRASE[o.size_name]} {o.color} {o.shape}"
        first = ["A", "Another", "A third"][min(leads[i], 2)]
        where = P.POSITION_PHRASES_LONG[o.cell]
        if template == 0:
            return f"{first} {desc} sits {where}."
        if template == 1:
            return f"{first} {desc} is placed {where}."
        return f"{first} {desc} appears {where}."

    def rel_sentence(a: int, rel: str, b: int) -> str:
        oa, ob = objs[a], objs[b]
        word = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}[rel]
        return f"The {oa.color} {oa.shape} is {word} the {ob.color} {ob.shape}."

    if template == 0:
        intro = f"A simple flat illustration on a plain {bg} background."
    elif template == 1:
        intro = f"The image shows {count_words.get(n, f'{n} objects')} against a {bg} background."
    else:
        intro = f"A minimal digital drawing with a uniform {bg} background and {count_words.get(n, f'{n} objects')}."
    sentences = [intro] + [obj_sentence(i, o) for i, o in enumerate(objs)]
    sentences += [rel_sentence(a, r, b) for a, r, b in scene.relations]
    classes = {(o.color, o.shape) for o in objs}
    if n > 1 and len(classes) == 1:
        o = objs[0]
        sentences.append(f"There are exactly {P.NUMBER_WORDS.get(n, str(n))} {o.color} {P.PLURALS[o.shape]} in total.")
    elif n > 1 and len({o.shape for o in objs}) == 1:
        sentences.append(f"There are exactly {P.NUMBER_WORDS.get(n, str(n))} {P.PLURALS[objs[0].shape]}, each a different color.")
    tail = [
        "The shapes have crisp edges and flat colors with no shading.",
        "Nothing else is in the picture.",
        "The objects do not touch or overlap.",
    ]
    sentences.append(tail[template])
    return " ".join(sentences)


def _phrase(o: SceneObject, *, pos: bool = False, size: bool = False, color: bool = True) -> str:
    """A short-caption phrase for one object ("a red circle", "a circle at the top left", ...)."""
    return P.object_phrase(o.color if color else None, o.shape, 1, o.cell if pos else None,
                           size=o.size_name if size else None)


# Short-caption templates, one function per scene kind: (scene, template index 0..3) -> text.


def _short_single(scene: Scene, t: int) -> str:
    o = scene.objects[0]
    if t == 0:
        return _phrase(o, pos=True)
    if t == 1:
        return f"{o.color} {o.shape}, {o.cell}"
    if t == 2:
        return _phrase(o, pos=True, size=True)
    return f"{_phrase(o, pos=True)} on {_a(scene.background)} background"


def _short_pair(scene: Scene, t: int) -> str:
    a, b = scene.objects
    if scene.kind == "two_objects" and t == 1:
        return f"{_phrase(a, color=False)} and {_phrase(b, color=False)}"
    if t == 2:
        return f"{_phrase(a, pos=True)} and {_phrase(b, pos=True)}"
    if t == 3:
        return f"{a.color} {a.shape} and {b.color} {b.shape}"
    return f"{_phrase(a)} and {_phrase(b)}"


def _short_position(scene: Scene, t: int) -> str:
    (ia, rel, ib), = scene.relations
    a, b = scene.objects[ia], scene.objects[ib]
    if t == 1 and rel in ("left of", "right of"):
        return f"{_phrase(a)} to the {rel.split()[0]} of {_phrase(b)}"
    if t == 2:
        return f"{_phrase(a)} {rel} {_phrase(b)} on {_a(scene.background)} background"
    return f"{_phrase(a)} {rel} {_phrase(b)}"


def _short_counting(scene: Scene, t: int) -> str:
    objs = scene.objects
    o = objs[0]
    same_color = len({x.color for x in objs}) == 1
    text = P.object_phrase(o.color if same_color else None, o.shape, len(objs), exact=True)
    return text + f" on {_a(scene.background)} background" if t == 1 else text


def _short_multi(scene: Scene, t: int) -> str:
    a, b, c = scene.objects
    if t == 1:
        return f"{a.color} {a.shape}, {b.color} {b.shape} and {c.color} {c.shape}"
    if t == 2:
        return f"{_phrase(a)}, {_phrase(b)}, and {_phrase(c)}"
    return f"{_phrase(a)}, {_phrase(b)} and {_phrase(c)}"


def _short_list(scene: Scene, t: int) -> str:
    return ", ".join(_phrase(o) for o in scene.objects)


_SHORT_TEMPLATES = {
    "single": _short_single, "two_objects": _short_pair, "color_attr": _short_pair,
    "position": _short_position, "counting": _short_counting, "multi": _short_multi,
}


def _short_caption(rng: np.random.Generator, scene: Scene, allow_heldout_phrasing: bool) -> str:
    """The scene's short caption: one of four templates of its kind, drawn from `rng`; with
    `allow_heldout_phrasing`, 15% of captions get the held-out prefix."""
    t = int(rng.integers(4))
    text = _SHORT_TEMPLATES.get(scene.kind, _short_list)(scene, t)
    if allow_heldout_phrasing and rng.random() < 0.15:
        text = P.HELDOUT_PREFIX + text
    return text


# --------------------------------------------------------------------------- scenes


def _pick(rng: np.random.Generator, seq, k: int = 1, replace: bool = False) -> list:
    idx = rng.choice(len(seq), size=k, replace=replace)
    return [seq[int(i)] for i in idx]


def _draw_items(rng: np.random.Generator, kind: str) -> tuple[list[dict], list[tuple[int, str, int]]]:
    """The objects (dicts with shape, color, size_name, optional cell) and relations of a random
    scene of `kind`, before placement."""
    relations: list[tuple[int, str, int]] = []
    if kind == "single":
        size_names = _pick(rng, P.SIZE_NAMES, 1, replace=True)
        items = [{"shape": _pick(rng, P.SHAPES)[0], "color": _pick(rng, P.COLOR_NAMES)[0],
                  "cell": _pick(rng, P.POSITIONS)[0]}]
    elif kind == "two_objects":
        shapes = _pick(rng, P.SHAPES, 2)
        colors = _pick(rng, P.COLOR_NAMES, 2, replace=True)
        items = [{"shape": s, "color": c} for s, c in zip(shapes, colors)]
    elif kind in ("color_attr", "position"):
        colors = _pick(rng, P.COLOR_NAMES, 2)
        shapes = _pick(rng, P.SHAPES, 2, replace=True)
        items = [{"shape": s, "color": c} for s, c in zip(shapes, colors)]
        if kind == "position":
            relations = [(0, _pick(rng, P.RELATIONS)[0], 1)]
    elif kind == "counting":
        n = int(rng.integers(1, 4))
        shape = _pick(rng, P.SHAPES)[0]
        if n > 1 and rng.random() < 0.3:
            colors = _pick(rng, P.COLOR_NAMES, n)
        else:
            colors = [_pick(rng, P.COLOR_NAMES)[0]] * n
        items = [{"shape": shape, "color": c} for c in colors]
    else:  # multi
        shapes = _pick(rng, P.SHAPES, 3, replace=True)
        colors = _pick(rng, P.COLOR_NAMES, 3)
        items = [{"shape": s, "color": c} for s, c in zip(shapes, colors)]
    if kind != "single":
        choices = ("small", "medium") if len(items) == 3 else ("small", "medium", "medium", "large")
        size_names = [choices[int(rng.integers(len(choices)))] for _ in items]
    for it, sn in zip(items, size_names):
        it["size_name"] = sn
    return items, relations


def _recolor(rng: np.random.Generator, items: list[dict], new_color: str) -> None:
    """Give one random object, and every object sharing its color, `new_color` (a same-color
    group stays one group, distinct colors stay distinct)."""
    old = items[int(rng.integers(len(items)))]["color"]
    for it in items:
        if it["color"] == old:
            it["color"] = new_color


def sample_scene(rng: np.random.Generator, kind: str | None = None, exclude_heldout: bool = True,
                 new_color: str | None = None) -> Scene:
    """Draw a random captioned scene of ``kind`` (one of SCENE_KINDS; random when None).

    With ``exclude_heldout`` (default) the short caption is never in the held-out phrasing
    (see :mod:`pixsigma.toy.prompts`); without it, about 15% of captions use that phrasing.
    ``new_color`` (one of ``P.NEW_COLORS``) recolors one object (with its same-color group) in it,
    captions included: data for teaching an adapter a color the base model never saw.
    """
    if new_color is not None and new_color not in P.NEW_COLORS:
        raise PixsigmaError(f"new_color {new_color!r}; expected one of {', '.join(P.NEW_COLORS)}")
    if not isinstance(rng, np.random.Generator):
        raise PixsigmaError(f"rng must be a numpy Generator (np.random.default_rng(...)), got {type(rng).__name__}")
    if kind is None:
        kind = SCENE_KINDS[int(rng.choice(len(SCENE_KINDS), p=_KIND_WEIGHTS / _KIND_WEIGHTS.sum()))]
    if kind not in SCENE_KINDS:
        raise PixsigmaError(f"unknown scene kind {kind!r}; expected one of {', '.join(SCENE_KINDS)}")
    background = P.BACKGROUND_NAMES[int(rng.integers(len(P.BACKGROUND_NAMES)))]
    for _ in range(50):
        items, relations = _draw_items(rng, kind)
        if new_color is not None:
            _recolor(rng, items, new_color)
        objects = _place(rng, items, relations)
        if objects is None:
            continue
        scene = Scene(objects=objects, background=background, kind=kind, relations=relations)
        scene.short_caption = _short_caption(rng, scene, allow_heldout_phrasing=not exclude_heldout)
        if exclude_heldout and P.is_heldout_prompt(scene.short_caption):  # defensive; templates never do this
            continue
        scene.long_caption = _long_caption(rng, scene)
        return scene
    raise PixsigmaError(f"could not place a {kind!r} scene after 50 attempts (internal error)")


def scene_from_prompt(prompt, rng: np.random.Generator, background: str | None = None) -> Scene:
    """A scene that satisfies ``prompt`` (a string or a PromptSpec), for reference renders.

    Unspecified colors / shapes / cells are drawn from ``rng``. The short caption is the prompt.
    Raises PixsigmaError when the prompt is not scorable or cannot be laid out.
    """
    spec = P.parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if not isinstance(spec, P.PromptSpec):
        raise PixsigmaError(f"prompt {prompt!r} is outside the toy vocabulary; expected e.g. 'a red circle at the top left'")
    if background is None:
        background = P.BACKGROUND_NAMES[int(rng.integers(len(P.BACKGROUND_NAMES)))]
    n_total = sum(c.count for c in spec.objects)
    if n_total > 9:
        raise PixsigmaError(f"prompt asks for {n_total} objects; at most 9 fit on the 3x3 grid")
    rels = [(r.a, r.relation, r.b) for r in spec.relations]
    for attempt in range(100):
        items: list[dict] = []
        owner: list[int] = []
        named_colors = {c.color for c in spec.objects if c.color}
        for ci, clause in enumerate(spec.objects):
            shape = clause.shape or _pick(rng, P.SHAPES)[0]
            for _ in range(clause.count):
                if clause.color:
                    color = clause.color
                else:
                    free = [c for c in P.COLOR_NAMES if c not in named_colors] or list(P.COLOR_NAMES)
                    color = _pick(rng, free)[0]
                items.append({"shape": shape, "color": color, "cell": clause.position})
                owner.append(ci)
        if n_total >= 3 or attempt > 50:
            choices = ("small", "medium")
        else:
            choices = ("small", "medium", "medium", "large")
        for it in items:
            it["size_name"] = choices[int(rng.integers(len(choices)))]
        first = {ci: owner.index(ci) for ci in range(len(spec.objects))}
        item_rels = [(first[a], r, first[b]) for a, r, b in rels]
        objects = _place(rng, items, item_rels, tries=50)
        if objects is None:
            continue
        scene = Scene(objects=objects, background=background, kind="prompt",
                      short_caption=prompt if isinstance(prompt, str) else P.canonical_prompt(spec),
                      relations=item_rels)
        if not score_detections(spec, detections_from_scene(scene)).correct:
            continue
        scene.long_caption = _long_caption(rng, scene)
        return scene
    raise PixsigmaError(f"could not lay out a scene for prompt {prompt!r}; expected at most a few objects that fit the 3x3 grid")


# --------------------------------------------------------------------------- streaming / dataset


def generate(
    n: int,
    seed: int = 0,
    size: int = 64,
    kind: str | None = None,
    exclude_heldout: bool = True,
    start: int = 0,
    new_color: str | None = None,
    new_color_share: float = 1.0,
) -> Iterator[tuple[Image.Image, str, str, Scene]]:
    """Yield ``(image, short_caption, long_caption, scene)`` for items ``start .. start+n-1``.

    Item ``i`` uses ``np.random.default_rng([seed, i])`` so it does not depend on the others.
    ``n=None`` streams forever. With ``new_color``, a ``new_color_share`` of the scenes (drawn per
    item) carry that color (see :func:`sample_scene`); the others are the regular scenes.
    """
    if not 0.0 <= new_color_share <= 1.0:
        raise PixsigmaError(f"new_color_share {new_color_share!r}; expected a fraction in [0, 1]")
    size = _check_size(size)
    if n is not None and (not isinstance(n, (int, np.integer)) or n < 0):
        raise PixsigmaError(f"n must be a non-negative integer (or None to stream forever), got {n!r}")
    i = int(start)
    end = None if n is None else int(start) + int(n)
    while end is None or i < end:
        rng = np.random.default_rng([int(seed), i])
        recolor = new_color is not None and rng.random() < new_color_share
        scene = sample_scene(rng, kind=kind, exclude_heldout=exclude_heldout, new_color=new_color if recolor else None)
        yield render(scene, size), scene.short_caption, scene.long_caption, scene
        i += 1


def _save_png(path: str, image: Image.Image) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def write_dataset(
    folder: str,
    n: int,
    seed: int = 0,
    size: int = 64,
    exclude_heldout: bool = True,
    progress: bool | None = None,
    control: str | None = None,
    new_color: str | None = None,
    new_color_share: float = 1.0,
) -> str:
    """Write ``n`` images under ``folder/images/`` and ``folder/data_info.json``; return its path.

    ``data_info.json`` is a list of dicts with keys ``path`` (relative to ``folder``), ``height``,
    ``width``, ``ratio`` (height / width), ``prompt`` (short caption), ``sharegpt4v`` (long
    caption), ``loss_mask`` (the object mask, ``images/NNNNNNN.mask.png``, for an object-weighted
    diffusion loss) and ``scene`` (Scene.to_dict()). ``control`` ("edges" or "mask") also writes a
    ControlNet control image per picture, ``images/NNNNNNN.control.png``, named by the record's
    ``control`` key: the exact object outlines (``mask_edges`` of the object mask) or the object
    mask itself. ``new_color`` / ``new_color_share``: scenes with a color outside the training
    palette (see :func:`generate`). Files are written atomically.
    """
    size = _check_size(size)
    if control not in (None, "edges", "mask"):
        raise PixsigmaError(f"write_dataset control {control!r}; expected None, 'edges' or 'mask'")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise PixsigmaError(f"write_dataset needs n >= 1 images, got {n!r}")
    img_dir = os.path.join(folder, "images")
    try:
        os.makedirs(img_dir, exist_ok=True)
    except OSError as e:
        raise PixsigmaError(f"cannot create dataset folder {folder!r}: {e}; expected a writable path") from e
    if progress is None:
        progress = n >= 500
    it = generate(n, seed=seed, size=size, exclude_heldout=exclude_heldout, new_color=new_color,
                  new_color_share=new_color_share)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=n, desc="toy dataset", unit="img")
    records = []
    for i, (img, short, long_, scene) in enumerate(it):
        rel = f"images/{i:07d}.png"
        _save_png(os.path.join(folder, rel), img)
        mask_rel = f"images/{i:07d}.mask.png"
        mask = render_mask(scene, size)
        _save_png(os.path.join(folder, mask_rel), mask)
        record = {
            "path": rel, "height": size, "width": size, "ratio": float(size) / float(size),
            "prompt": short, "sharegpt4v": long_, "loss_mask": mask_rel, "scene": scene.to_dict(),
        }
        if control is not None:
            from pixsigma.data.control import mask_edges

            record["control"] = f"images/{i:07d}.control.png"
            _save_png(os.path.join(folder, record["control"]), Image.fromarray(mask_edges(mask)) if control == "edges" else mask)
        records.append(record)
    info_path = os.path.join(folder, "data_info.json")
    write_json(info_path, records, indent=1)
    logger.info("wrote %d toy images (%dpx, seed %d) to %s", n, size, seed, folder)
    return info_path
