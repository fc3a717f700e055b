"""Held-out adherence of the shipped model with and without the "lime" LoRA: the new-color
prompts (`new:lime`, 40 prompts) and the regular held-out set (240 prompts), bf16, DPM-Solver++
20 steps, guidance 4.5. Also rescores the regular images with the evaluator's old 8-color
palette, to show what adding "lime" to the evaluator changes by itself.

    python experiments/lora_concept/evaluate.py runs/lora_concept/run/lora.safetensors \
        --out experiments/lora_concept/results [--seeds-new 2] [--seeds-regular 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pixsigma.eval.adherence import evaluate_adherence
from pixsigma.io import write_json
from pixsigma.toy import evaluate as E
from pixsigma.toy import prompts as P


def rescore_with_old_palette(folder: Path, items, seeds: int) -> dict:
    """The report of saved images when the evaluator knows only the training palette."""
    names, rgb = E._COLOR_NAMES, E._COLOR_RGB
    E._COLOR_NAMES = P.COLOR_NAMES
    E._COLOR_RGB = np.array([P.COLORS[c] for c in P.COLOR_NAMES], dtype=np.float32)
    try:
        files = sorted(folder.glob("*.png"))
        jobs = [(it, s) for it in items for s in range(seeds)]
        return E.evaluate((Image.open(f).convert("RGB"), it.prompt, it.category) for f, (it, _) in zip(files, jobs))
    finally:
        E._COLOR_NAMES, E._COLOR_RGB = names, rgb


def summary(report: dict) -> dict:
    sa = report["single_attributes"]
    return {"color": sa["color"], "shape": sa["shape"], "position": sa["position"], "all three": sa["all"],
            "overall": report["overall"], "n_single": sa["n"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("lora")
    ap.add_argument("--out", default="experiments/lora_concept/results")
    ap.add_argument("--seeds-new", type=int, default=2)
    ap.add_argument("--seeds-regular", type=int, default=1)
    ap.add_argument("--images", default="runs/lora_concept/eval_images")
    args = ap.parse_args()
    out, rows = Path(args.out), {}
    for name, loras in (("base", []), ("lora", [(args.lora, 1.0)])):
        for prompts, seeds in (("new:lime", args.seeds_new), ("heldout", args.seeds_regular)):
            folder = Path(args.images) / f"{name}_{prompts.replace(':', '_')}"
            rep = evaluate_adherence(None, prompts=prompts, seeds=seeds, dtype="bf16", loras=loras,
                                     save_images=folder, json_path=out / f"{name}_{prompts.replace(':', '_')}.json")
            rows[f"{name} / {prompts}"] = summary(rep)
            if prompts == "heldout":
                old = rescore_with_old_palette(folder, P.heldout_prompts(), seeds)
                rows[f"{name} / {prompts} (8-color evaluator)"] = summary(old)
    write_json(out / "summary.json", rows, indent=1)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
