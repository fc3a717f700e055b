"""Held-out adherence of the shipped model with and without the "lime" LoRA: the new-color
prompts (`new:lime`, 40 prompts) and the regular held-out set (240 prompts), bf16, DPM-Solver++
20 steps, guidance 4.5. Also rescores the regular images with the evaluator's old 8-color
palette, to show what adding "lime" to the evaluator changes by itself. --vae swaps in another
decoder (the shipped VAE cannot decode lime: vae_decoder.py fine-tunes one that can).

    python experiments/lora_concept/evaluate.py runs/lora_concept/run/lora.safetensors \
        --out experiments/lora_concept/results [--seeds-new 2] [--seeds-regular 1] [--vae FOLDER]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

import torch

from pixsigma.eval.adherence import evaluate_model, load_prompt_set
from pixsigma.io import write_json
from pixsigma.pipeline import SigmaPipeline
from pixsigma.vae import VAE
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
    ap.add_argument("--vae", default=None, help="a VAE folder replacing the shipped one")
    args = ap.parse_args()
    out, rows = Path(args.out), {}
    pipe = SigmaPipeline.from_pretrained(None, dtype="bf16", text_dtype=torch.float32, vae_dtype=torch.float32)
    if args.vae:
        pipe.vae = VAE(args.vae)
    for name in ("base", "lora"):
        if name == "lora":
            pipe.load_lora_weights(args.lora)
        for prompts, seeds in (("new:lime", args.seeds_new), ("heldout", args.seeds_regular)):
            tag = f"{name}_{prompts.replace(':', '_')}"
            rep = evaluate_model(pipe, prompts, list(range(seeds)), save_dir=Path(args.images) / tag,
                                 items=load_prompt_set(prompts))
            write_json(out / f"{tag}.json", rep, indent=1)
            rows[f"{name} / {prompts}"] = summary(rep)
            if prompts == "heldout":
                old = rescore_with_old_palette(Path(args.images) / tag, P.heldout_prompts(), seeds)
                rows[f"{name} / {prompts} (8-color evaluator)"] = summary(old)
    write_json(out / "summary.json", rows, indent=1)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
