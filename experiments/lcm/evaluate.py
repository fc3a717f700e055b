"""Held-out adherence and denoising time per image: the LCM-distilled default model at 1/2/4/8
steps (sampler lcm, no guidance) against the shipped model with DPM-Solver++ at 5/10/20 steps
(guidance 4.5), both transformers in bf16. Writes one adherence report per row and a summary JSON.

    python experiments/lcm/evaluate.py --lcm runs/lcm/full/model.safetensors --every 5 --seeds 2 \
        --out experiments/lcm/results

Prompts: every N-th prompt of the 240 held-out prompts (all categories keep their share), or of
one category's (--category single: the 49 single-object prompts that color / shape / position /
all three are measured on). Time:
the pipeline's "denoise" timing of one-image calls (text encoding and VAE decoding excluded),
median of --repeats calls per row, rows interleaved so that machine load hits them alike.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

import torch

from pixsigma.eval.adherence import evaluate_model
from pixsigma.io import write_json
from pixsigma.pipeline import SigmaPipeline
from pixsigma.toy.prompts import heldout_prompts

ROWS = [("dpm-solver", 20, 4.5), ("dpm-solver", 10, 4.5), ("dpm-solver", 5, 4.5),
        ("lcm", 8, 1.0), ("lcm", 4, 1.0), ("lcm", 2, 1.0), ("lcm", 1, 1.0)]
COLUMNS = {"color": ("single_attributes", "color"), "shape": ("single_attributes", "shape"),
           "position": ("single_attributes", "position"), "all three": ("single_attributes", "all"), "overall": ("overall",)}


def _get(report, path):
    for key in path:
        report = report[key]
    return report


def denoise_times(pipes: dict, repeats: int) -> dict:
    times = {row: [] for row in ROWS}
    for r in range(repeats):
        for row in ROWS:
            sampler, steps, cfg = row
            out = pipes[sampler]("a photo of a red circle at the top left", num_inference_steps=steps, guidance_scale=cfg,
                                 sampler=sampler, seed=r, output_type="latent")
            times[row].append(out.timings["denoise"])
    return {row: (statistics.median(t), min(t), max(t)) for row, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lcm", required=True, help="the distilled transformer (.safetensors)")
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--category", default=None, help="only the held-out prompts of this category (e.g. single)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="experiments/lcm/results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.manual_seed(0)
    out = Path(args.out)
    items = [i for i in heldout_prompts() if args.category in (None, i.category)][:: args.every]
    kw = {"dtype": "bf16", "text_dtype": torch.float32, "vae_dtype": torch.float32}
    pipes = {"dpm-solver": SigmaPipeline.from_pretrained(None, **kw), "lcm": SigmaPipeline.from_pretrained(None, transformer=args.lcm, **kw)}
    assert pipes["lcm"].lcm, "the distilled checkpoint does not record that it is an LCM model"
    times = denoise_times(pipes, args.repeats)
    summary = []
    for row in ROWS:
        sampler, steps, cfg = row
        report = evaluate_model(pipes[sampler], "heldout", list(range(args.seeds)), steps, cfg, sampler, None, 16, items=items)
        write_json(out / f"{sampler}_{steps}.json", report, indent=1)
        med, lo, hi = times[row]
        summary.append({"sampler": sampler, "steps": steps, "guidance_scale": cfg, "denoise_s": med, "denoise_min_s": lo,
                        "denoise_max_s": hi, **{k: _get(report, p) for k, p in COLUMNS.items()}})
        logging.info("%s", json.dumps(summary[-1]))
    base = summary[0]["denoise_s"]
    lines = ["| sampler | steps | CFG | " + " | ".join(COLUMNS) + " | denoise s/image (median, min-max) | speed-up vs DPM 20 |",
             "|---|---|---|" + "---|" * len(COLUMNS) + "---|---|"]
    for s in summary:
        cells = [f"{100 * s[k]:.1f}%" for k in COLUMNS]
        lines.append(f"| {s['sampler']} | {s['steps']} | {s['guidance_scale']:g} | " + " | ".join(cells)
                     + f" | {s['denoise_s']:.3f} ({s['denoise_min_s']:.3f}-{s['denoise_max_s']:.3f}) | {base / s['denoise_s']:.1f}x |")
    write_json(out / "summary.json", {"prompts": len(items), "seeds": args.seeds, "rows": summary}, indent=1)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
