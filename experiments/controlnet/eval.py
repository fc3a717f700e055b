"""Held-out adherence of the shipped toy model with and without a trained ControlNet.

Each held-out prompt gets the control map of its own scene: a scene that satisfies the prompt
(`scene_from_prompt`, seeded per prompt), its exact object outlines (`mask_edges(render_mask)`)
as the control image. The same prompts, seeds and sampler run once with the control and once
without (the base alone). Reported per condition: the evaluator's table (single-object color /
shape / position / all three, two objects, counting, ...) and the mean IoU between the objects
the evaluator detects in the generated image (each detection's fitted shape drawn in its box)
and the scene's object mask.

    python experiments/controlnet/eval.py RUN/controlnet.safetensors --condition with --save OUT/with [--part 0/2]
    python experiments/controlnet/eval.py --condition without --save OUT/without
    python experiments/controlnet/eval.py --save - --report OUT/with --json with.json
"""

from __future__ import annotations

import argparse
import json
import zlib

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pixsigma import SigmaPipeline
from pixsigma.data.control import mask_edges
from pixsigma.toy.evaluate import _coverage, detect_objects, evaluate, format_table
from pixsigma.toy.prompts import heldout_prompts
from pixsigma.toy.render import render_mask, scene_from_prompt


def detected_mask(image, size: int) -> np.ndarray:
    """Union of the evaluator's detections, each its fitted shape drawn in its bounding box."""
    out = np.zeros((size, size), dtype=bool)
    for d in detect_objects(image):
        x0, y0, x1, y1 = d.bbox
        out |= _coverage(d.shape, size, size, x0, y0, x1 - x0, y1 - y0) > 0.5
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def run(pipe, items, seeds, steps, use_control: bool, scale: float, save_dir: Path):
    """Generate and save every prompt × seed; one line per image in save_dir/images.jsonl."""
    save_dir.mkdir(parents=True, exist_ok=True)
    with open(save_dir / "images.jsonl", "a") as log:
        for item in tqdm(items, desc="control" if use_control else "no control", unit="prompt"):
            rng = np.random.default_rng(zlib.crc32(item.prompt.encode()))
            mask = render_mask(scene_from_prompt(item.prompt, rng), size=64)
            gens = [torch.Generator().manual_seed(s) for s in seeds]
            kw = {"control_image": mask_edges(mask), "controlnet_conditioning_scale": scale} if use_control else {}
            out = pipe([item.prompt] * len(seeds), num_inference_steps=steps, generator=gens, **kw)
            truth = np.asarray(mask) >= 128
            for seed, im in zip(seeds, out.images):
                name = f"{zlib.crc32(item.prompt.encode()):08x}_s{seed}.png"
                im.save(save_dir / name)
                log.write(json.dumps({"file": name, "prompt": item.prompt, "category": item.category,
                                      "iou": iou(detected_mask(im, im.width), truth)}) + "\n")


def report_of(save_dirs) -> dict:
    """The evaluator's report and the mean IoU over the images saved in `save_dirs`."""
    rows = [(d, json.loads(line)) for d in save_dirs for line in open(Path(d) / "images.jsonl")]
    report = evaluate((Image.open(Path(d) / r["file"]).convert("RGB"), r["prompt"], r["category"]) for d, r in rows)
    report["mean_iou"] = float(np.mean([r["iou"] for _, r in rows]))
    return report


def main():
    p = argparse.ArgumentParser()
    p.add_argument("controlnet", nargs="?", default=None, help="needed for --condition with")
    p.add_argument("--condition", choices=["with", "without"], default="with")
    p.add_argument("--prompts", type=int, default=240)
    p.add_argument("--part", default="0/1", help="K/N: generate every N-th prompt from the K-th (parallel processes)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--save", required=True, help="folder for the images (and images.jsonl)")
    p.add_argument("--report", nargs="*", default=None, help="only report over these saved folders")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.report is None:
        k, n = map(int, a.part.split("/"))
        on = a.condition == "with"
        # without control a pipeline with a ControlNet loaded generates exactly what the base does
        pipe = SigmaPipeline.from_pretrained(None, controlnet=a.controlnet if on else None)
        run(pipe, heldout_prompts(a.prompts)[k::n], list(range(a.seeds)), a.steps, on, a.scale, Path(a.save))
        return
    report = report_of(a.report)
    print(f"mean IoU {report['mean_iou']:.3f}")
    print(format_table(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
