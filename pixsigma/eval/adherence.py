"""Prompt adherence of a model, GenEval-style, on the toy world (`pixsigma eval adherence`).

Generates every prompt of a set (the held-out set by default: ≥ 200 prompts whose phrasing the
trainer never sees) with several fixed seeds, scores each image with `pixsigma.toy.evaluate`
(object detection by color segmentation + shape geometry), and reports per-category accuracy
and, for single-object prompts, color / shape / position / all-three accuracy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from pixsigma.errors import PixsigmaError
from pixsigma.io import atomic_write
from pixsigma.pipeline import SigmaPipeline, check_guidance_interval
from pixsigma.toy.evaluate import evaluate, save_json
from pixsigma.toy.prompts import NEW_COLORS, PromptItem, heldout_prompts, new_color_prompts, quick_prompts

log = logging.getLogger(__name__)

PROMPT_SETS = ("heldout", "quick", *(f"new:{c}" for c in NEW_COLORS))


def load_prompt_set(name_or_file: str) -> list[PromptItem]:
    """'heldout', 'quick', 'new:COLOR' (prompts with a color outside the training palette), or a
    text file with one prompt per line (category inferred)."""
    if name_or_file == "heldout":
        return heldout_prompts()
    if name_or_file == "quick":
        return quick_prompts()
    if name_or_file.startswith("new:"):
        return new_color_prompts(name_or_file[4:])
    path = Path(name_or_file)
    if not path.is_file():
        raise PixsigmaError(f"prompt set {name_or_file!r} is neither one of {PROMPT_SETS} nor a readable file")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise PixsigmaError(f"{path}: no prompts (expected one prompt per line)")
    return [PromptItem(prompt=line, category=None) for line in lines]


def generate_for_prompts(pipe, items: list[PromptItem], seeds, steps: int = 20, guidance_scale: float = 4.5,
                         sampler: str = "dpm-solver", size: int | None = None, batch_size: int = 16,
                         save_dir: Path | None = None, guidance_interval: tuple[float, float] | None = None,
                         step_cache=None):
    """Yield (image, prompt, category) for every prompt × seed; image i of a prompt uses its seed.

    With `save_dir`, image k (in that order) is also written there as ``{k:05d}_s{seed}.png``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PixsigmaError(f"batch size must be a positive integer, got {batch_size!r}")
    jobs = [(item, seed) for item in items for seed in seeds]
    for start in tqdm(range(0, len(jobs), batch_size), desc="adherence", unit="batch"):
        chunk = jobs[start:start + batch_size]
        generators = [torch.Generator().manual_seed(int(seed)) for _, seed in chunk]
        out = pipe([item.prompt for item, _ in chunk], num_inference_steps=steps, guidance_scale=guidance_scale,
                   sampler=sampler, height=size, width=size, generator=generators, guidance_interval=guidance_interval,
                   step_cache=step_cache)
        for k, ((item, seed), image) in enumerate(zip(chunk, out.images)):
            if save_dir is not None:
                atomic_write(Path(save_dir) / f"{start + k:05d}_s{seed}.png", lambda tmp: image.save(tmp, format="PNG"))
            yield image, item.prompt, item.category


def evaluate_model(pipe, prompt_set: str = "heldout", seeds=(0, 1, 2, 3), steps: int = 20, guidance_scale: float = 4.5,
                   sampler: str = "dpm-solver", size: int | None = None, batch_size: int = 16,
                   save_dir: Path | None = None, guidance_interval: tuple[float, float] | str | None = None,
                   items: list[PromptItem] | None = None, step_cache=None) -> dict:
    """The adherence report of a loaded pipeline (see :func:`pixsigma.toy.evaluate.evaluate`),
    with the settings it was measured with under ``settings``. ``guidance_interval`` None: the
    pipeline's own; a pair or "T_MIN,T_MAX" string otherwise, as the pipeline reads it.
    ``items``: the prompts of ``prompt_set`` when the caller has loaded them already.
    ``step_cache``: the pipeline's training-free step cache setting (None: off)."""
    items = load_prompt_set(prompt_set) if items is None else items
    report = evaluate(generate_for_prompts(pipe, items, seeds, steps, guidance_scale, sampler, size, batch_size, save_dir,
                                           guidance_interval, step_cache))
    # the interval the pipeline sampled with, read as the pipeline reads it
    interval = pipe.guidance_interval if guidance_interval is None else check_guidance_interval(guidance_interval)
    report["settings"] = {"prompt_set": prompt_set, "prompts": len(items), "seeds": list(seeds), "steps": steps,
                          "guidance_scale": guidance_scale, "guidance_interval": list(interval) if interval else None,
                          "sampler": sampler, "size": size, "model": pipe.name,
                          "step_cache": None if step_cache is None else str(step_cache)}
    return report


def evaluate_adherence(model=None, *, transformer=None, prompts: str = "heldout", seeds: int | Sequence[int] = 4,
                       steps: int = 20, guidance_scale: float = 4.5,
                       guidance_interval: tuple[float, float] | str | None = None, sampler: str = "dpm-solver",
                       size: int | None = None, batch_size: int = 16, dtype: str = "fp32",
                       save_images=None, json_path=None, loras: Sequence[tuple[str, float]] = ()) -> dict:
    """Load a model and measure its prompt adherence; return the report (and save it as JSON).

    model: a pipeline folder (None: the shipped default model); transformer: a checkpoint that
    replaces the folder's; prompts: "heldout", "quick" or a text file with one prompt per line;
    seeds: images per prompt (seeds 0..N-1) or the seeds themselves; dtype: the transformer's
    weights ("fp32" or "bf16"; the text encoder and VAE stay fp32); save_images: a folder to keep
    the generated images in; json_path: where to write the report; loras: (file, scale) adapters
    applied to the transformer, adding up. The other arguments are the
    pipeline's sampling settings, checked by the pipeline.
    """
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seeds:
        raise PixsigmaError("no seeds; expected at least one image per prompt")
    items = load_prompt_set(prompts)  # a bad prompt file fails before the slow load
    pipe = SigmaPipeline.from_pretrained(model, transformer=transformer, dtype=dtype, text_dtype=torch.float32,
                                         vae_dtype=torch.float32)
    names = [pipe.load_lora_weights(path) for path, _ in loras]
    if names:
        pipe.set_adapters(names, [float(scale) for _, scale in loras])
    report = evaluate_model(pipe, prompts, seeds, steps, guidance_scale, sampler, size, batch_size,
                            Path(save_images) if save_images else None, guidance_interval, items=items)
    report["settings"]["dtype"] = dtype
    report["settings"]["loras"] = [[str(path), float(scale)] for path, scale in loras]
    if json_path:
        save_json(report, json_path)
        log.info("saved %s", json_path)
    return report
