"""Prompt adherence of a model, GenEval-style, on the toy world (`pixsigma eval adherence`).

Generates every prompt of a set (the held-out set by default: ≥ 200 prompts whose phrasing the
trainer never sees) with several fixed seeds, scores each image with `pixsigma.toy.evaluate`
(object detection by color segmentation + shape geometry), and reports per-category accuracy
and, for single-object prompts, color / shape / position / all-three accuracy.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from pixsigma.errors import PixsigmaError
from pixsigma.toy.evaluate import evaluate, format_table, save_json
from pixsigma.toy.prompts import PromptItem, heldout_prompts, quick_prompts

log = logging.getLogger(__name__)

PROMPT_SETS = ("heldout", "quick")


def load_prompt_set(name_or_file: str) -> list[PromptItem]:
    """'heldout', 'quick', or a text file with one prompt per line (category inferred)."""
    if name_or_file == "heldout":
        return heldout_prompts()
    if name_or_file == "quick":
        return quick_prompts()
    path = Path(name_or_file)
    if not path.is_file():
        raise PixsigmaError(f"prompt set {name_or_file!r} is neither one of {PROMPT_SETS} nor a readable file")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise PixsigmaError(f"{path}: no prompts (expected one prompt per line)")
    return [PromptItem(prompt=line, category=None) for line in lines]


def generate_for_prompts(pipe, items: list[PromptItem], seeds, steps: int = 20, guidance_scale: float = 4.5,
                         sampler: str = "dpm-solver", size: int | None = None, batch_size: int = 16,
                         save_dir: Path | None = None, guidance_interval: tuple[float, float] | None = None):
    """Yield (image, prompt, category) for every prompt × seed; image i of a prompt uses its seed."""
    jobs = [(item, seed) for item in items for seed in seeds]
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
    for start in tqdm(range(0, len(jobs), batch_size), desc="adherence", unit="batch"):
        chunk = jobs[start:start + batch_size]
        generators = [torch.Generator().manual_seed(int(seed)) for _, seed in chunk]
        out = pipe([item.prompt for item, _ in chunk], num_inference_steps=steps, guidance_scale=guidance_scale,
                   sampler=sampler, height=size, width=size, generator=generators, guidance_interval=guidance_interval)
        for k, ((item, seed), image) in enumerate(zip(chunk, out.images)):
            if save_dir is not None:
                image.save(save_dir / f"{start + k:05d}_s{seed}.png")
            yield image, item.prompt, item.category


def evaluate_model(pipe, prompt_set: str = "heldout", seeds=(0, 1, 2, 3), steps: int = 20, guidance_scale: float = 4.5,
                   sampler: str = "dpm-solver", size: int | None = None, batch_size: int = 16,
                   save_dir: Path | None = None, guidance_interval: tuple[float, float] | None = None) -> dict:
    items = load_prompt_set(prompt_set)
    report = evaluate(generate_for_prompts(pipe, items, seeds, steps, guidance_scale, sampler, size, batch_size, save_dir,
                                           guidance_interval))
    interval = guidance_interval or pipe.guidance_interval
    report["settings"] = {"prompt_set": prompt_set, "prompts": len(items), "seeds": list(seeds), "steps": steps,
                          "guidance_scale": guidance_scale, "guidance_interval": list(interval) if interval else None,
                          "sampler": sampler, "size": size, "model": pipe.name}
    return report


def run_adherence(args) -> dict:
    """The CLI command: load the pipeline, evaluate, print the table, save JSON."""
    from pixsigma.pipeline import SigmaPipeline, check_guidance_interval

    interval = check_guidance_interval(args.guidance_interval)  # before the slow load
    # dtype is a name ("fp32" / "bf16"); the pipeline resolves it with the project's one table
    pipe = SigmaPipeline.from_pretrained(args.model, transformer=args.transformer, dtype=args.dtype, text_dtype=torch.float32,
                                         vae_dtype=torch.float32)
    seeds = list(range(args.seeds))
    report = evaluate_model(pipe, args.prompts, seeds, args.steps, args.cfg, args.sampler, args.size, args.batch_size,
                            Path(args.save_images) if args.save_images else None, interval)
    report["settings"]["dtype"] = args.dtype
    print(format_table(report))
    if args.json:
        save_json(report, args.json)
        log.info("saved %s", args.json)
    return report
