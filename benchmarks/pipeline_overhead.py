"""The whole `pipe(...)` call: SigmaPipeline vs diffusers' PixArtSigmaPipeline on the same folder.

XL/2 transformer at 256px with random weights, a tiny T5 text encoder (4096 channels) and a tiny
factor-8 VAE, 10 DPM-Solver++ steps with CFG 4.5, a short prompt padded to 300 tokens, the same
initial latents. Both calls run interleaved in one process (machine noise hits both alike); the
ratio ours/diffusers is reported per repeat, with its median and spread, plus the largest pixel
difference between the two images (the same image is part of the target).

    python benchmarks/pipeline_overhead.py [--threads 2] [--repeats 3] [--steps 10]
    python benchmarks/pipeline_overhead.py --profile     # also: cProfile of one of our calls
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import print_table, save  # noqa: E402

PROMPT = "a small cactus with a happy face in the desert"


def build_folder(folder: Path, depth: int = 28) -> Path:
    """A diffusers-layout folder: tiny T5 (d_model 4096) and VAE (factor 8), XL/2 at 256px (`depth`
    blocks), random weights."""
    from pixsigma.model.checkpoint import save_transformer
    from pixsigma.model.transformer import PixArtSigmaTransformer, xl2_at
    from tests.tiny_components import build_pipeline_folder

    build_pipeline_folder(folder, sample_size=32, vae_levels=4, vae_channels=32, vae_groups=8, hidden=64, depth=2,
                          max_tokens=300, caption_channels=4096)
    torch.manual_seed(0)
    model = PixArtSigmaTransformer(xl2_at(256, depth=depth)).eval()
    with torch.no_grad():  # the from-scratch init zeroes the output layers: random weights throughout
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_transformer(model, folder / "transformer", to="diffusers")
    return folder


def make_calls(folder: Path, steps: int, guidance: float):
    """(ours, ours with F.linear, theirs): each runs one whole call from the same latents and returns
    the image as numpy. "ours" is the default pipeline (float32 Linear layers through oneDNN on
    reordered weights); "ours, F.linear" switches that off (`pipe.onednn_linear = False`)."""
    from diffusers import PixArtSigmaPipeline

    from pixsigma.pipeline import SigmaPipeline

    ours = SigmaPipeline.from_pretrained(folder)
    theirs = PixArtSigmaPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    common = dict(num_inference_steps=steps, guidance_scale=guidance, height=256, width=256, output_type="np")

    def run_ours():
        return ours(PROMPT, latents=latents, max_sequence_length=300, **common).images[0]

    def run_ours_plain():
        ours.onednn_linear = False
        try:
            return run_ours()
        finally:
            ours.onednn_linear = True

    def run_theirs():
        return theirs(PROMPT, latents=latents.clone(), max_sequence_length=300, use_resolution_binning=False,
                      clean_caption=False, **common).images[0]

    return run_ours, run_ours_plain, run_theirs


def profile(fn, top: int = 25) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run_ours, run_ours_plain, run_theirs = make_calls(build_folder(Path(tmp) / "p"), args.steps, args.guidance)
        reference = run_theirs()  # also the warm-ups
        diffs = {"ours": float(np.abs(run_ours() - reference).max()),
                 "ours, F.linear": float(np.abs(run_ours_plain() - reference).max())}
        if args.profile:
            print(profile(run_ours))
        calls = {"ours": run_ours, "ours, F.linear": run_ours_plain, "diffusers": run_theirs}
        times = {name: [] for name in calls}
        for _ in range(args.repeats):
            for name, fn in calls.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    rows = []
    for name in ("ours", "ours, F.linear"):
        ratios = [o / d for o, d in zip(times[name], times["diffusers"])]
        rows.append({"case": f"xl2-256px-{args.steps}steps-cfg", "pipeline": name, "s": statistics.median(times[name]),
                     "diffusers_s": statistics.median(times["diffusers"]), "ratio_median": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios), "max_pixel_diff": diffs[name]})
    print_table(rows, list(rows[0]))
    save("pipeline_overhead", {"rows": rows, "times": times, "threads": args.threads,
                               "steps": args.steps, "guidance": args.guidance, "caption_tokens": 300})


if __name__ == "__main__":
    main()
