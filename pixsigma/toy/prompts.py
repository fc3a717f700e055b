"""Vocabulary of the toy world, the prompt parser and the evaluation prompt sets.

The toy world has four shapes (circle, square, triangle, cross), eight object colors, six
backgrounds, a 3x3 grid of positions and four relations. Every caption the generator writes and
every evaluation prompt can be parsed back by :func:`parse_prompt` into a :class:`PromptSpec`: a
list of required objects (count, color, shape, grid position) and relations between them.

Held-out scheme (phrasing)
--------------------------
The held-out evaluation prompts all start with ``"a photo of "`` followed by a canonical
description (``"a photo of a red circle at the top left"``). The training caption templates in
:mod:`pixsigma.toy.render` never start with that phrase (no training caption contains the word
"photo"), so no held-out prompt string can appear verbatim in training data. This tests prompt
adherence on unseen *strings*, not on unseen (color, shape, position) combinations: every
combination can occur in training. ``render.sample_scene(..., exclude_heldout=True)`` (the
default) enforces the rule; with ``exclude_heldout=False`` the generator may also emit captions
in the held-out phrasing. :func:`is_heldout_prompt` tells whether a string is in that phrasing.

Counting semantics follow GenEval: ``"a"``/``"an"``/no article means "at least one", a number
word (``"one"``, ``"two"``, ``"three"``) means exactly that many of the named class.
"""

from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass

import numpy as np

from pixsigma.errors import PixsigmaError

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- vocabulary

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
}

# Object colors: pairwise RGB distance >= 100, and >= 100 from every background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 130, 0),
    "yellow": (245, 230, 30),
    "green": (30, 170, 50),
    "cyan": (0, 200, 220),
    "blue": (30, 70, 230),
    "purple": (130, 40, 190),
    "pink": (250, 110, 200),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
# Colors outside the training palette: the default data never draws them, so no shipped model has
# seen them. An adapter (LoRA) learns one as a new concept from `write_dataset(new_color=...)`; the
# parser and the evaluator know them. Same spacing rules as COLORS, and at least 58 RGB units of
# residual from every other color's mix line on every background (the evaluator reads a pixel as
# a mix of the background and one color).
NEW_COLORS: dict[str, tuple[int, int, int]] = {
    "lime": (150, 240, 0),
}
ALL_COLORS: dict[str, tuple[int, int, int]] = {**COLORS, **NEW_COLORS}

# Backgrounds: "plain" (white / grays) and a few muted colored ones, all far from object colors.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "light gray": (205, 205, 205),
    "dark gray": (45, 45, 50),
    "black": (12, 12, 12),
    "beige": (235, 220, 185),
    "navy": (20, 30, 80),
}
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)

# 3x3 grid, row-major (row 0 = top). Names are used in scene dicts and reports.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
# Short-caption phrase for each grid cell.
POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
# Long-caption phrase for each grid cell.
POSITION_PHRASES_LONG: dict[str, str] = {
    "top left": "in the top left corner",
    "top": "at the top, centered horizontally",
    "top right": "in the top right corner",
    "left": "on the left side, halfway down",
    "center": "in the middle of the image",
    "right": "on the right side, halfway down",
    "bottom left": "in the bottom left corner",
    "bottom": "at the bottom, centered horizontally",
    "bottom right": "in the bottom right corner",
}

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}
SIZE_NAMES: tuple[str, ...] = ("small", "medium", "large")

CATEGORIES: tuple[str, ...] = ("single", "colors", "counting", "two_objects", "color_attr", "position")
HELDOUT_PREFIX = "a photo of "


def cell_of(x: float, y: float) -> str:
    """Grid cell name of a normalized point (x to the right, y down, both in [0, 1])."""
    col = min(max(int(x * 3.0), 0), 2)
    row = min(max(int(y * 3.0), 0), 2)
    return POSITIONS[row * 3 + col]


def cell_index(position: str) -> tuple[int, int]:
    """(row, col) of a grid cell name."""
    if position not in POSITIONS:
        raise PixsigmaError(f"unknown grid position {position!r}; expected one of {', '.join(POSITIONS)}")
    i = POSITIONS.index(position)
    return i // 3, i % 3


# --------------------------------------------------------------------------- spec types


@dataclass(frozen=True)
class ObjectClause:
    """One required object (or group of identical objects) of a prompt.

    ``count`` objects matching ``color`` / ``shape`` / ``position`` (``None`` = any) must be
    present; with ``exact`` the number of matching objects must equal ``count``.
    """

    count: int = 1
    exact: bool = False
    color: str | None = None
    shape: str | None = None
    position: str | None = None

    def describe(self) -> str:
        noun = self.shape or "object"
        if self.count != 1:
            noun = PLURALS.get(noun, noun + "s")
        words = [("exactly " if self.exact else "at least ") + str(self.count)]
        if self.color:
            words.append(self.color)
        words.append(noun)
        if self.position:
            words.append(POSITION_PHRASES[self.position])
        return " ".join(words)

    def phrase(self) -> str:
        """Canonical short-caption phrase ("a red circle at the top left", "two green triangles")."""
        return object_phrase(self.color, self.shape or "object", self.count, self.position, exact=self.exact)


@dataclass(frozen=True)
class RelationClause:
    """Object clause ``a`` is ``relation`` (one of RELATIONS) object clause ``b``."""

    a: int
    relation: str
    b: int


@dataclass(frozen=True)
class PromptSpec:
    objects: tuple[ObjectClause, ...]
    relations: tuple[RelationClause, ...] = ()

    @property
    def category(self) -> str:
        return infer_category(self)

    def canonical(self) -> str:
        """The canonical (training-style) phrasing of this spec."""
        return canonical_prompt(self)


@dataclass(frozen=True)
class PromptItem:
    """An evaluation prompt with its category (one of CATEGORIES)."""

    prompt: str
    category: str


def infer_category(spec: PromptSpec) -> str:
    """Evaluator category of a spec: single, colors, counting, two_objects, color_attr, position,
    multi (three or more objects) or other."""
    objs = spec.objects
    if spec.relations:
        return "position"
    if any(o.exact or o.count > 1 for o in objs):
        return "counting"
    if len(objs) == 1:
        o = objs[0]
        if o.position is not None:
            return "single"
        if o.color is not None and o.shape is not None:
            return "colors"
        return "other"
    if len(objs) == 2:
        if all(o.color is not None for o in objs):
            return "color_attr"
        return "two_objects"
    return "multi"


# --------------------------------------------------------------------------- phrasing


def object_phrase(
    color: str | None,
    shape: str,
    count: int = 1,
    position: str | None = None,
    *,
    exact: bool = False,
    size: str | None = None,
    article: bool = True,
) -> str:
    """Short phrase for an object group: "a red circle", "two green triangles at the top"."""
    if count == 1 and not exact:
        noun = shape
    else:
        noun = PLURALS.get(shape, shape + "s") if count != 1 else shape
    words = []
    if size and size != "medium":
        words.append(size)
    if color:
        words.append(color)
    words.append(noun)
    if count == 1 and not exact:
        lead = ("an " if words[0][0] in "aeiou" else "a ") if article else ""
    else:
        lead = NUMBER_WORDS.get(count, str(count)) + " "
    text = lead + " ".join(words)
    if position:
        text += " " + POSITION_PHRASES[position]
    return text


def canonical_prompt(spec: PromptSpec) -> str:
    """Canonical training-style prompt for a spec (the held-out set adds HELDOUT_PREFIX)."""
    objs = spec.objects
    if spec.relations:
        if len(objs) != 2 or len(spec.relations) != 1:
            raise PixsigmaError("canonical_prompt supports one relation between two objects; got "
                                f"{len(spec.relations)} relations over {len(objs)} objects")
        r = spec.relations[0]
        return f"{objs[r.a].phrase()} {r.relation} {objs[r.b].phrase()}"
    phrases = [o.phrase() for o in objs]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def is_heldout_prompt(text: str) -> bool:
    """True when ``text`` is in the held-out phrasing ("a photo of ...")."""
    return _normalize(text).startswith(HELDOUT_PREFIX)


# --------------------------------------------------------------------------- parser

_NUMBERS = {
    "a": (1, False), "an": (1, False), "the": (1, False),
    "one": (1, True), "two": (2, True), "three": (3, True), "four": (4, True), "five": (5, True),
    "1": (1, True), "2": (2, True), "3": (3, True), "4": (4, True), "5": (5, True),
    "single": (1, True),
}
_SIZE_WORDS = {"small", "large", "big", "tiny", "little", "medium", "medium-sized", "huge"}
_SHAPE_WORDS = {s: s for s in SHAPES}
_SHAPE_WORDS.update({p: s for s, p in PLURALS.items()})
_COLOR_WORDS = {c: c for c in ALL_COLORS}
_COLOR_WORDS.update({"violet": "purple", "magenta": "pink", "teal": "cyan"})

_POSITION_ALIASES = {
    "top left": "top left", "left top": "top left",
    "top right": "top right", "right top": "top right",
    "bottom left": "bottom left", "left bottom": "bottom left",
    "bottom right": "bottom right", "right bottom": "bottom right",
    "top": "top", "top center": "top", "center top": "top",
    "bottom": "bottom", "bottom center": "bottom", "center bottom": "bottom",
    "left": "left", "center left": "left", "left center": "left",
    "right": "right", "center right": "right", "right center": "right",
    "center": "center",
}
_PREFIXES = (
    "a photo of ", "a picture of ", "an image of ", "an image with ", "an illustration of ",
    "a render of ", "a rendering of ", "a drawing of ", "there is ", "there are ",
)
_BG_SUFFIX = re.compile(
    r"\s*,?\s*(?:on|against|over|with|in front of)\s+(?:a|an|the)\s+(?:plain\s+)?[a-z ]+?\s+background$"
)
_REL_SPLIT = re.compile(
    r"\s+(?:is\s+|sits\s+)?(?:(?:to|on)\s+the\s+)?(left|right)\s+of\s+"
    r"|\s+(?:is\s+|sits\s+)?(above|below|under|over|beneath)\s+"
)
_REL_WORDS = {"left": "left of", "right": "right of", "above": "above", "over": "above",
              "below": "below", "under": "below", "beneath": "below"}
_INVALID = object()


def _normalize(text: str) -> str:
    t = text.lower().strip()
    t = re.sub(r"[.!?;]+$", "", t).strip()
    t = re.sub(r"\s+", " ", t)
    return t


def parse_position(text: str):
    """Grid cell named by a position phrase ("at the top left", "in the upper-right corner").

    Returns the cell name, ``None`` for an empty phrase, or an internal sentinel when the phrase
    is not a position (used by the parser; do not rely on it).
    """
    t = text.strip().replace("-", " ")
    if not t:
        return None
    t = re.sub(r"\s+", " ", t)
    t = re.sub(r"^(?:is\s+|sits\s+|located\s+|placed\s+)?(?:at|in|on|toward|towards|near)\s+(?:the\s+)?", "", t)
    t = re.sub(r"\s+of\s+the\s+(?:image|picture|frame|canvas|scene|photo)$", "", t)
    t = re.sub(r"\s+(?:corner|side|edge|part|area|region)$", "", t)
    words = []
    for w in t.split(" "):
        w = {"upper": "top", "lower": "bottom", "middle": "center", "centre": "center"}.get(w, w)
        words.append(w)
    t = " ".join(words)
    if t == "center center":
        t = "center"
    return _POSITION_ALIASES.get(t, _INVALID)


def _parse_object(phrase: str):
    """ObjectClause from "a small red circle at the top left", or None when not parseable."""
    words = phrase.strip().split(" ")
    if not words or words == [""]:
        return None
    i = 0
    count, exact = 1, False
    if words[i] in _NUMBERS:
        count, exact = _NUMBERS[words[i]]
        i += 1
    while i < len(words) and words[i] in _SIZE_WORDS:
        i += 1
    color = None
    if i < len(words) and words[i] in _COLOR_WORDS:
        color = _COLOR_WORDS[words[i]]
        i += 1
    while i < len(words) and words[i] in _SIZE_WORDS:
        i += 1
    if i >= len(words):
        return None
    shape_word = words[i]
    if shape_word in ("object", "objects", "shape", "shapes"):
        shape = None
    elif shape_word in _SHAPE_WORDS:
        shape = _SHAPE_WORDS[shape_word]
    else:
        return None
    plural = shape_word.endswith("s") and shape_word not in ("cross",)
    if plural and count == 1 and not exact:
        return None  # "a circles"
    if color is None and shape is None:
        return None
    position = parse_position(" ".join(words[i + 1:]))
    if position is _INVALID:
        return None
    return ObjectClause(count=count, exact=exact, color=color, shape=shape, position=position)


def _parse_list(text: str):
    segments = [s for s in re.split(r",\s*and\s+|\s+and\s+|\s*,\s*", text) if s.strip()]
    objects: list[ObjectClause] = []
    for seg in segments:
        clause = _parse_object(seg)
        if clause is None:
            pos = parse_position(seg)
            if objects and pos not in (None, _INVALID) and objects[-1].position is None:
                last = objects[-1]
                objects[-1] = ObjectClause(last.count, last.exact, last.color, last.shape, pos)
                continue
            return None
        objects.append(clause)
    return objects or None


def parse_prompt(text: str) -> PromptSpec | None:
    """Parse a prompt into a PromptSpec, or return None when it is outside the toy vocabulary.

    Never raises for unknown wording; raises PixsigmaError only when ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise PixsigmaError(f"prompt must be a string, got {type(text).__name__}")
    t = _normalize(text)
    for p in _PREFIXES:
        if t.startswith(p):
            t = t[len(p):]
            break
    t = _BG_SUFFIX.sub("", t).strip()
    if not t:
        return None
    m = _REL_SPLIT.search(t)
    if m is not None:
        left, right = t[: m.start()], t[m.end():]
        rel = _REL_WORDS[m.group(1) or m.group(2)]
        a, b = _parse_object(left), _parse_object(right)
        if a is not None and b is not None:
            return PromptSpec(objects=(a, b), relations=(RelationClause(0, rel, 1),))
    objects = _parse_list(t)
    if objects is None:
        return None
    return PromptSpec(objects=tuple(objects))


# --------------------------------------------------------------------------- prompt sets


def _category_pools() -> dict[str, list[str]]:
    """Every held-out prompt (without the prefix) per category, in a fixed order."""
    pools: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    for color, shape, pos in itertools.product(COLOR_NAMES, SHAPES, POSITIONS):
        pools["single"].append(object_phrase(color, shape, 1, pos))
    for color, shape in itertools.product(COLOR_NAMES, SHAPES):
        pools["colors"].append(object_phrase(color, shape))
    for n, color, shape in itertools.product((1, 2, 3), COLOR_NAMES, SHAPES):
        pools["counting"].append(object_phrase(color, shape, n, exact=True))
    for n, shape in itertools.product((2, 3), SHAPES):
        pools["counting"].append(object_phrase(None, shape, n, exact=True))
    for s1, s2 in itertools.permutations(SHAPES, 2):
        pools["two_objects"].append(f"{object_phrase(None, s1)} and {object_phrase(None, s2)}")
    for c1, c2 in itertools.permutations(COLOR_NAMES, 2):
        for s1, s2 in itertools.permutations(SHAPES, 2):
            pools["color_attr"].append(f"{object_phrase(c1, s1)} and {object_phrase(c2, s2)}")
    for c1, c2 in itertools.permutations(COLOR_NAMES, 2):
        for s1, s2 in itertools.product(SHAPES, SHAPES):
            for rel in RELATIONS:
                pools["position"].append(f"{object_phrase(c1, s1)} {rel} {object_phrase(c2, s2)}")
    return pools


def heldout_prompts(n: int = 240, seed: int = 0) -> list[PromptItem]:
    """Deterministic held-out evaluation prompts, balanced over CATEGORIES.

    Each category gets ``n // 6`` prompts (drawn without replacement from all prompts of that
    category); a category with fewer distinct prompts (two_objects has 12, colors 32) gives all
    of them and the rest goes to the other categories. Prompts are "a photo of ..." phrased.
    """
    if not isinstance(n, int) or n < len(CATEGORIES):
        raise PixsigmaError(f"heldout_prompts needs an integer n >= {len(CATEGORIES)}, got {n!r}")
    pools = _category_pools()
    total = sum(len(v) for v in pools.values())
    if n > total:
        raise PixsigmaError(f"heldout_prompts: n={n} exceeds the {total} distinct held-out prompts")
    rng = np.random.default_rng([int(seed), 7919])
    order = {c: [pools[c][i] for i in rng.permutation(len(pools[c]))] for c in CATEGORIES}
    quota = {c: 0 for c in CATEGORIES}
    remaining = n
    open_cats = list(CATEGORIES)
    while remaining > 0 and open_cats:
        share = max(remaining // len(open_cats), 1)
        for c in list(open_cats):
            if remaining == 0:
                break
            take = min(share, len(pools[c]) - quota[c], remaining)
            quota[c] += take
            remaining -= take
            if quota[c] >= len(pools[c]):
                open_cats.remove(c)
    items = [PromptItem(HELDOUT_PREFIX + p, c) for c in CATEGORIES for p in order[c][: quota[c]]]
    return items


_QUICK = {
    "single": ["a red circle at the top left", "a blue square in the center",
               "a green triangle at the bottom right", "a yellow cross on the left"],
    "colors": ["a purple circle", "an orange square", "a cyan triangle", "a pink cross"],
    "counting": ["two green triangles", "three red circles", "one blue square", "two crosses"],
    "two_objects": ["a circle and a square", "a triangle and a cross",
                    "a square and a triangle", "a cross and a circle"],
    "color_attr": ["a red circle and a blue square", "a yellow triangle and a purple cross",
                   "a green square and a pink circle", "an orange cross and a cyan triangle"],
    "position": ["a red circle left of a blue square", "a green triangle above a yellow circle",
                 "a purple square right of an orange cross", "a cyan cross below a pink triangle"],
}


def quick_prompts() -> list[PromptItem]:
    """A small fixed set (24 prompts, 4 per category) for a fast regression check."""
    return [PromptItem(HELDOUT_PREFIX + p, c) for c in CATEGORIES for p in _QUICK[c]]


def new_color_prompts(color: str) -> list[PromptItem]:
    """Held-out prompts that use a color outside the training palette (one of NEW_COLORS): one
    object of that color for every shape × grid cell ("single", 36 prompts), then every shape
    without a position ("colors", 4), in the held-out phrasing."""
    if color not in NEW_COLORS:
        raise PixsigmaError(f"new-color prompts need one of {', '.join(NEW_COLORS)}, got {color!r}")
    single = [object_phrase(color, shape, 1, pos) for shape, pos in itertools.product(SHAPES, POSITIONS)]
    colors = [object_phrase(color, shape) for shape in SHAPES]
    return [PromptItem(HELDOUT_PREFIX + p, "single") for p in single] + [PromptItem(HELDOUT_PREFIX + p, "colors") for p in colors]
