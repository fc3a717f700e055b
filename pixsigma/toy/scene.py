"""The toy world's ground truth: scenes, the shapes' geometry, and when objects satisfy a prompt.

A :class:`Scene` holds 1 to 3 objects (shape, color, normalized center, normalized side length),
a background, two captions (short and long) and the relations its short caption states. The
renderer (:mod:`pixsigma.toy.render`) draws scenes and lays them out to satisfy prompts; the
evaluator (:mod:`pixsigma.toy.evaluate`) reads :class:`Detection` s off images. Both rest on
this module, which imports neither of them.

Geometry. Coordinates are normalized to [0, 1] (x to the right, y down). Every shape fills an
axis-aligned ``size x size`` box centered on ``(x, y)``: circle = inscribed disc, square = the box,
triangle = apex at the top middle and base along the bottom edge, cross = a plus sign whose arms
are ``CROSS_ARM`` of the box wide (:func:`inside_shape` gives the region exactly). The center
always lies inside its grid cell with a margin of ``CELL_MARGIN``, objects keep at least ``GAP``
apart, and objects stay ``EDGE_PAD`` inside the image border.

Sizes (fraction of the image side): small 0.19-0.22 (12-14 px at 64 px), medium 0.29-0.35
(19-22 px), large 0.42-0.45 (27-29 px).

Scoring (:func:`score_detections`) follows GenEval: "a"/"an" means at least one object of the
named class (color and/or shape, plus the grid cell when one is named); a number word means
exactly that many; distinct clauses need distinct objects; "A left of B" holds when B's center
is more than ``RELATION_MIN`` (fraction of the image width) to the right of A's (same for the
other relations, y grows downwards). An image is correct only when every clause holds. The
objects scored are detections read off an image, or a scene's own objects
(:func:`detections_from_scene`), which is how the renderer checks a layout against its prompt.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from pixsigma.errors import PixsigmaError
from pixsigma.toy import prompts as P

SIZE_RANGES: dict[str, tuple[float, float]] = {
    "small": (0.19, 0.22),
    "medium": (0.29, 0.35),
    "large": (0.42, 0.45),
}
CROSS_ARM = 0.36
CELL_MARGIN = 0.03
EDGE_PAD = 0.02
GAP = 0.04
RELATION_MIN = 0.05
_MAX_DETECTIONS = 16


# --------------------------------------------------------------------------- scenes


@dataclass
class SceneObject:
    shape: str
    color: str
    x: float
    y: float
    size: float
    size_name: str = "medium"

    @property
    def cell(self) -> str:
        return P.cell_of(self.x, self.y)

    def to_dict(self) -> dict:
        return {
            "shape": self.shape, "color": self.color, "x": round(float(self.x), 5),
            "y": round(float(self.y), 5), "size": round(float(self.size), 5),
            "size_name": self.size_name, "cell": self.cell,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SceneObject":
        try:
            return cls(str(d["shape"]), str(d["color"]), float(d["x"]), float(d["y"]),
                       float(d["size"]), str(d.get("size_name", "medium")))
        except (KeyError, TypeError, ValueError) as e:
            raise PixsigmaError(f"bad scene object {d!r}: {e}; expected keys shape, color, x, y, size") from e


@dataclass
class Scene:
    objects: list[SceneObject]
    background: str
    kind: str = "custom"
    short_caption: str = ""
    long_caption: str = ""
    relations: list[tuple[int, str, int]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "background": self.background,
            "objects": [o.to_dict() for o in self.objects],
            "relations": [[a, r, b] for a, r, b in self.relations],
        }

    @classmethod
    def from_dict(cls, d: dict, short_caption: str = "", long_caption: str = "") -> "Scene":
        if not isinstance(d, dict) or "objects" not in d:
            raise PixsigmaError(f"bad scene dict {d!r}; expected a dict with 'objects' and 'background'")
        return cls(
            objects=[SceneObject.from_dict(o) for o in d["objects"]],
            background=str(d.get("background", "white")),
            kind=str(d.get("kind", "custom")),
            short_caption=short_caption,
            long_caption=long_caption,
            relations=[(int(a), str(r), int(b)) for a, r, b in d.get("relations", [])],
        )


def inside_shape(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether unit-box coordinates (u right, v down, both in [0, 1]) are inside ``shape``."""
    box = (u >= 0.0) & (u <= 1.0) & (v >= 0.0) & (v <= 1.0)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "square":
        return box
    if shape == "triangle":
        return box & (np.abs(u - 0.5) <= v / 2.0)
    if shape == "cross":
        half = CROSS_ARM / 2.0
        return box & ((np.abs(u - 0.5) <= half) | (np.abs(v - 0.5) <= half))
    raise PixsigmaError(f"unknown shape {shape!r}; expected one of {', '.join(P.SHAPES)}")


# --------------------------------------------------------------------------- scoring


@dataclass
class Detection:
    """An object read off an image by the evaluator, or a scene object's ground truth."""

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
    """How one image (its detections) scored against one prompt."""

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


def detections_from_scene(scene) -> list[Detection]:
    """Ground-truth detections of a Scene (or a scene dict from data_info.json)."""
    if isinstance(scene, dict):
        scene = Scene.from_dict(scene)
    out = []
    for o in scene.objects:
        out.append(Detection(color=o.color, shape=o.shape, center=(o.x, o.y), area=o.size * o.size,
                             bbox=(-1, -1, -1, -1), shape_scores={o.shape: 1.0}))
    return out


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
