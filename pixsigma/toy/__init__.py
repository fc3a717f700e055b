"""Toy world: synthetic captioned shape images and a GenEval-style adherence evaluator.

Submodules: :mod:`pixsigma.toy.render` (scenes, rendering, datasets), :mod:`pixsigma.toy.prompts`
(vocabulary, prompt parser, held-out prompt sets), :mod:`pixsigma.toy.evaluate` (detector and
scorer). The functions ``render.render`` and ``evaluate.evaluate`` are not re-exported here
because their names are those of the submodules.
"""

from pixsigma.toy import evaluate, prompts, render
from pixsigma.toy.evaluate import (
    Detection,
    Result,
    clean_render_accuracy,
    detect_objects,
    evaluate_folder,
    format_table,
    save_json,
    score,
)
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
from pixsigma.toy.render import Scene, SceneObject, generate, sample_scene, scene_from_prompt, write_dataset

__all__ = [
    "evaluate", "prompts", "render",
    "BACKGROUNDS", "CATEGORIES", "COLORS", "POSITIONS", "RELATIONS", "SHAPES",
    "Detection", "PromptItem", "PromptSpec", "Result", "Scene", "SceneObject",
    "clean_render_accuracy", "detect_objects", "evaluate_folder", "format_table",
    "generate", "heldout_prompts", "is_heldout_prompt", "parse_prompt", "quick_prompts",
    "sample_scene", "save_json", "scene_from_prompt", "score", "write_dataset",
]
