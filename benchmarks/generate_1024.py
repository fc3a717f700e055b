"""One 1024×1024 image from the full-size XL_2 on this CPU: fp32 vs the fastest correct settings.

Random XL_2 weights; the caption embeddings are precomputed (300 tokens × 4096, 24 valid for the
prompt, 2 for the empty negative prompt) so no 4.7B-parameter T5 is needed. 20 DPM-Solver++ steps
with guidance 4.5, the CFG pair batched. Cases: fp32 (the baseline), bf16, bf16 with KV
compression on the deep half (conv, R=2), and that under torch.compile (`--compile` of
pixsigma generate; its one-off compile is timed apart, as `compile_seconds`, and not counted in
the minutes per image). A case can run fewer steps (--steps-fp32 2, say) and is then
extrapolated to 20 (the table says so). Reports minutes per image and peak RSS (each case runs
in its own process).

    python benchmarks/generate_1024.py [--threads 2] [--steps-fp32 20] [--steps-bf16 20] [--steps-kv 20]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, save  # noqa: E402

CASES = {"fp32": ("fp32", False, False), "bf16": ("bf16", False, False), "bf16 + KV compression": ("bf16", True, False),
         "bf16 + KV + compile": ("bf16", True, True)}


def run_case(name: str, steps: int, threads: int) -> dict:
    from pixsigma.diffusion.samplers import sample
    from pixsigma.model.transitions import add_kv_compression
    from pixsigma.model.transformer import PixArtSigmaTransformer, xl2_at
    from pixsigma.pipeline import compile_transformer, guided_model_fn

    torch.set_num_threads(threads)
    dtype_name, kv, compiled = CASES[name]
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    torch.manual_seed(0)
    model = PixArtSigmaTransformer(xl2_at(1024)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    if kv:
        model = add_kv_compression(model).eval()
    model = model.to(dtype)
    g = torch.Generator().manual_seed(0)
    caption = torch.randn(2, 300, 4096, generator=g)
    mask = torch.zeros(2, 300, dtype=torch.long)
    mask[0, :2], mask[1, :24] = 1, 1  # [negative ""; prompt]
    latents = torch.randn(1, 4, 128, 128, generator=g)
    denoiser, compile_seconds = model, 0.0
    with torch.no_grad():
        if compiled:
            # the one-off compile: the first call at this shape, minus what a compiled call costs
            denoiser = compile_transformer(model)
            context = model.prepare_caption(caption.to(dtype), mask)
            x_in, t_in = torch.cat([latents, latents]), torch.full((2,), 999)
            start = time.perf_counter()
            denoiser(x_in, t_in, context)
            first = time.perf_counter() - start
            start = time.perf_counter()
            denoiser(x_in, t_in, context)
            compile_seconds = first - (time.perf_counter() - start)
        start = time.perf_counter()
        context = model.prepare_caption(caption.to(dtype), mask)
        x = sample(guided_model_fn(denoiser, context, 4.5, 4), latents, "dpm-solver", steps=20 if steps >= 20 else steps)
    seconds = time.perf_counter() - start
    return {"case": name, "steps_run": steps, "seconds": seconds, "minutes_per_image_20_steps": seconds / steps * 20 / 60,
            "extrapolated": steps < 20, "compile_seconds": round(compile_seconds, 1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "finite": bool(torch.isfinite(x).all())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps-fp32", type=int, default=20, help="steps to run for the fp32 baseline (extrapolated to 20)")
    parser.add_argument("--steps-bf16", type=int, default=20, help="steps to run for plain bf16 (extrapolated to 20); "
                        "the fastest case always runs all 20")
    parser.add_argument("--steps-kv", type=int, default=20, help="steps to run for bf16 + KV compression without compile "
                        "(extrapolated to 20); the compiled case always runs all 20")
    parser.add_argument("--only", default=None, help="comma-separated case names to run (default: all)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--steps", type=int, default=20, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.steps, args.threads)))
        return
    rows = []
    names = [n.strip() for n in args.only.split(",")] if args.only else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f"--only: unknown case(s) {unknown}; expected some of {list(CASES)}")
    for name in names:
        steps = {"fp32": args.steps_fp32, "bf16": args.steps_bf16, "bf16 + KV compression": args.steps_kv}.get(name, 20)
        out = subprocess.run([sys.executable, __file__, "--case", name, "--steps", str(steps), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print_table(rows[-1:], list(rows[-1]))
    base = rows[0]["minutes_per_image_20_steps"]
    for r in rows:
        r[f"speedup_vs_{rows[0]['case']}"] = base / r["minutes_per_image_20_steps"]
    print()
    print_table(rows, list(rows[0]))
    save("generate_1024", {"rows": rows, "threads": args.threads})


if __name__ == "__main__":
    main()
