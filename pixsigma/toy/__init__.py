"""Toy world: synthetic captioned shape images and a GenEval-style adherence evaluator.

Submodules, from the bottom up: :mod:`pixsigma.toy.prompts` (vocabulary, prompt parser,
held-out prompt sets), :mod:`pixsigma.toy.scene` (scenes, the shapes' geometry, when objects
satisfy a prompt), then :mod:`pixsigma.toy.render` (drawing, random scenes, datasets) and
:mod:`pixsigma.toy.evaluate` (detector, scorer, reports), which do not import each other, and
:mod:`pixsigma.toy.reference` (the evaluator's accuracy on reference renders), which uses both.
The functions ``render.render`` and ``evaluate.evaluate`` are not re-exported here because
their names are those of the submodules.
"""

from pixsigma.toy import evaluate, prompts, reference, render, scene
from pixsigma.toy.evaluate import detect_objects, evaluate_folder, format_table, save_json, score
from pixsigma.toy.prompts import (
    BACKGROUNDS,
    CATEGORIES,
    COLORS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    PromptItem,
    PromptSpec,
    heldout_prompts,
    is_heldout_prompt,
    parse_prompt,
    quick_prompts,
)
from pixsigma.toy.reference import clean_render_accuracy
from pixsigma.toy.render import generate, sample_scene, scene_from_prompt, write_dataset
from pixsigma.toy.scene import Detection, Result, Scene, SceneObject

__all__ = [
    "evaluate", "prompts", "reference", "render", "scene",
    "BACKGROUNDS", "CATEGORIES", "COLORS", "POSITIONS", "RELATIONS", "SHAPES",
    "Detection", "PromptItem", "PromptSpec", "Result", "Scene", "SceneObject",
    "clean_render_accuracy", "detect_objects", "evaluate_folder", "format_table",
    "generate", "heldout_prompts", "is_heldout_prompt", "parse_prompt", "quick_prompts",
    "sample_scene", "save_json", "scene_from_prompt", "score", "write_dataset",
]
