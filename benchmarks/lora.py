"""LoRA inference cost: one denoising forward with no adapter, an unmerged rank-R adapter (the
fast path, and peft's own forward for comparison), and the same adapter fused (`fuse_lora`), as
same-run ratios against no adapter (median of the interleaved repeats' ratios, with the spread).

Models: XL_2's width (hidden 1152, 16 heads, caption 4096) at a reduced depth, at 512px (64×64
latents, 1024 tokens) with a CFG batch of 2; and the shipped toy model at 64px (CFG batch 2).
The caption's keys/values are computed once, as the pipeline does. Targets: "attention" (the
common choice) and "all" (the official script's list).

    python benchmarks/lora.py [--rank 16] [--depth 4] [--repeats 5] [--threads 1]

Writes a table to stdout and JSON to benchmarks/results/lora.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import interleaved_times, print_table, save  # noqa: E402


def forward_fn(model, latent: int, batch: int = 2, tokens: int = 32):
    g = torch.Generator().manual_seed(0)
    c = model.config
    x = torch.randn(batch, c.in_channels, latent, latent, generator=g)
    y = torch.randn(batch, tokens, c.caption_channels, generator=g)
    t = torch.full((batch,), 500.0)

    def run():
        with torch.no_grad():
            context = model.prepare_caption(y)  # once per image in the pipeline; cheap next to a step
            return model(x, t, context)

    return run


def measure(name: str, build, latent: int, rank: int, targets: str, repeats: int) -> list[dict]:
    """Rows per variant: median ms, and the ratio to no adapter as the median (min-max) of the
    repeats' own ratios (each repeat runs every variant back to back, so noise hits all alike)."""
    from pixsigma.model import lora as L
    from pixsigma.model.lora_layers import peft_path

    base, unmerged, fused = build(), build(), build()
    for m in (unmerged, fused):
        L.add_lora(m, L.LoraSpec(rank=rank, targets=(targets,)))
        with torch.no_grad():
            for _, p in L.adapter_parameters(m):
                p.normal_(0, 0.01)
    L.fuse_lora(fused)
    run_unmerged = forward_fn(unmerged, latent)

    def run_peft():
        with peft_path():
            return run_unmerged()

    times = interleaved_times({"none": forward_fn(base, latent), "unmerged": run_unmerged, "unmerged, peft path": run_peft,
                               "fused": forward_fn(fused, latent)}, repeats)
    rows = []
    for variant, ts in times.items():
        ratios = [t / ref for t, ref in zip(ts, times["none"])]
        rows.append({"model": name, "targets": targets, "rank": rank, "variant": variant, "ms": round(1000 * statistics.median(ts), 1),
                     "ratio": round(statistics.median(ratios), 3), "ratio_spread": f"{min(ratios):.3f}-{max(ratios):.3f}",
                     "spread_ms": f"{1000 * min(ts):.1f}-{1000 * max(ts):.1f}"})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from pixsigma.model.checkpoint import load_transformer
    from pixsigma.model.transformer import XL_2, PixArtSigmaTransformer
    from pixsigma.pipeline import DEFAULT_MODEL_DIR

    def xl():
        torch.manual_seed(0)
        return PixArtSigmaTransformer(XL_2.with_(depth=args.depth, sample_size=64, pe_interpolation=1.0)).eval()

    def toy():
        return load_transformer(DEFAULT_MODEL_DIR / "transformer", dtype=torch.float32)

    rows = []
    for targets in ("attention", "all"):
        rows += measure(f"XL_2 width, depth {args.depth}, 512px", xl, 64, args.rank, targets, args.repeats)
        rows += measure("toy (shipped), 64px", toy, 16, args.rank, targets, args.repeats)  # 16x16 latents (VAE factor 4)
    print_table(rows, ["model", "targets", "rank", "variant", "ms", "ratio", "ratio_spread", "spread_ms"])
    save("lora", {"args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
