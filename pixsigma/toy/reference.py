"""The evaluator's accuracy on reference renders: the ceiling any model's adherence can reach.

A model is scored by :mod:`pixsigma.toy.evaluate` on the images it generates. The same evaluator
run on images the renderer drew exactly as prompted (:mod:`pixsigma.toy.render`) measures the
evaluator itself: near 100% on clean renders, and less after a transform such as blur and noise
or a VAE round trip, which shows what a model working through that VAE can at best be credited
with. This module sits above both the renderer and the evaluator, which do not import each other.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from pixsigma.errors import PixsigmaError
from pixsigma.toy import prompts as P
from pixsigma.toy.evaluate import evaluate
from pixsigma.toy.render import render, sample_scene, scene_from_prompt


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
