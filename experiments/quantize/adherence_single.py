"""Held-out adherence of the shipped toy model per quantization mode: the 49 single-object
prompts (color / shape / position / all three) and every 4th of the 240 held-out prompts
(overall), --seeds seeds each, 20 DPM-Solver++ steps, guidance 4.5. bf16 is the reference; the
modes quantize its transformer (svdquant calibrates on the model's own prompts, as
`from_pretrained(quantize=...)` does).

    python experiments/quantize/adherence_single.py --modes bf16 int8 --seeds 2 --out experiments/quantize/adherence
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pixsigma.eval.adherence import evaluate_model
from pixsigma.io import write_json
from pixsigma.pipeline import SigmaPipeline
from pixsigma.toy.prompts import heldout_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", nargs="+", default=["bf16", "int8", "int4", "svdquant"])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default="experiments/quantize/adherence")
    args = ap.parse_args()
    every = heldout_prompts()
    single = [i for i in every if i.category == "single"]
    seeds = list(range(args.seeds))
    for mode in args.modes:
        pipe = SigmaPipeline.from_pretrained(None, dtype="bf16", text_dtype=torch.float32, vae_dtype=torch.float32,
                                             quantize=None if mode == "bf16" else mode)
        rep_single = evaluate_model(pipe, "heldout", seeds, items=single)
        rep_all = evaluate_model(pipe, "heldout", seeds, items=every[::4])
        sa = rep_single["single_attributes"]
        row = {"mode": mode, "color": sa["color"], "shape": sa["shape"], "position": sa["position"], "all": sa["all"],
               "n_single": sa["n"], "overall": rep_all["overall"], "n_overall": len(every[::4]) * len(seeds)}
        write_json(Path(args.out) / f"{mode}.json", row, indent=1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
