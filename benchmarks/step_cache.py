"""Training-free step caching: time of a whole `pipe(...)` call with each cache setting against the
uncached call, in one run, and how far the result moves.

XL/2 width at 256px with random weights (its depth settable: the ratio depends on the share of a
step the blocks take), the tiny T5 / VAE folder of benchmarks/pipeline_overhead.py, DPM-Solver++
with CFG. Every setting runs interleaved with the others; the table gives median seconds, the
speed-up over no cache, the fraction of block evaluations skipped, and the mean absolute change
of the final latents (random weights: a measure of drift, not of image quality).

    python benchmarks/step_cache.py [--depth 28] [--steps 20] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import print_table, save  # noqa: E402
from pipeline_overhead import PROMPT, build_folder  # noqa: E402

SETTINGS = {"none": None, "fora-2": {"mode": "fora", "interval": 2}, "fora-3": {"mode": "fora", "interval": 3},
            "delta-2": {"mode": "delta", "interval": 2}, "delta-3": {"mode": "delta", "interval": 3}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=28)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from pixsigma.pipeline import SigmaPipeline

    with tempfile.TemporaryDirectory() as tmp:
        pipe = SigmaPipeline.from_pretrained(build_folder(Path(tmp) / "p", depth=args.depth))
    calls = []
    for block in pipe.transformer.blocks:
        block.register_forward_hook(lambda *a: calls.append(1))
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))

    def run(setting):
        calls.clear()
        out = pipe(PROMPT, latents=latents, num_inference_steps=args.steps, output_type="latent", step_cache=setting)
        return out.images, len(calls)

    results = {name: run(s) for name, s in SETTINGS.items()}  # also the warm-up
    times = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):
        for name, setting in SETTINGS.items():
            start = time.perf_counter()
            run(setting)
            times[name].append(time.perf_counter() - start)
    base, full_calls = results["none"]
    rows = []
    for name in SETTINGS:
        latent, n = results[name]
        seconds = statistics.median(times[name])
        rows.append({"cache": name, "seconds": seconds, "speedup": statistics.median(times["none"]) / seconds,
                     "min_s": min(times[name]), "max_s": max(times[name]), "blocks_skipped": 1 - n / full_calls,
                     "latent_change": float((latent - base).abs().mean())})
    print_table(rows, list(rows[0]))
    save("step_cache", {"rows": rows, "depth": args.depth, "steps": args.steps, "threads": args.threads,
                        "resolution": 256, "guidance": 4.5, "sampler": "dpm-solver"})


if __name__ == "__main__":
    main()
