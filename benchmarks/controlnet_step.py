"""ControlNet cost per sampling step: the transformer forward with control against without.

The shipped toy model (or --model PATH) with a fresh ControlNet of N copied blocks, one
classifier-free-guided step (batch 2, caption K/V prepared once as in sampling), timed
interleaved with the base alone. The expected ratio is about 1 + N/depth (the copies run beside
the first N+1 base blocks; patch and position embedding of the control latent are small).

    python benchmarks/controlnet_step.py [--blocks 2 4] [--repeats 7] [--threads 1] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_medians, print_table, save  # noqa: E402

from pixsigma.io import as_dtype  # noqa: E402
from pixsigma.model.checkpoint import load_transformer  # noqa: E402
from pixsigma.model.controlnet import ControlNetTransformer  # noqa: E402
from pixsigma.pipeline import DEFAULT_MODEL_DIR  # noqa: E402


def timed(fns: dict, repeats: int) -> dict:
    """Per callable: (median, min, max) seconds over `repeats` interleaved rounds after one warm-up."""
    interleaved_medians(fns, repeats=1, warmup=1)
    rounds = [interleaved_medians(fns, repeats=1, warmup=0) for _ in range(repeats)]
    return {name: (statistics.median(t), min(t), max(t)) for name in fns for t in [[r[name] for r in rounds]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR / "transformer" / "model.safetensors"))
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="fp32", help="the weights' dtype (the pipeline's default is fp32)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_transformer(args.model, dtype=as_dtype(args.dtype))
    cfg = base.config
    side = cfg.sample_size
    x = torch.randn(2, cfg.in_channels, side, side)
    t = torch.tensor([500.0, 500.0])
    caption, mask = torch.randn(2, 20, cfg.caption_channels, dtype=base.x_embedder.proj.weight.dtype), torch.ones(2, 20)
    control = torch.randn(1, cfg.in_channels, side, side)
    fns = {"base": lambda ctx=base.prepare_caption(caption, mask): base(x, t, ctx)}
    for n in args.blocks:
        net = ControlNetTransformer.from_transformer(base, n).eval()
        ctx = net.prepare_caption(caption, mask)
        fns[f"controlnet N={n}"] = lambda net=net, ctx=ctx: net(x, t, ctx, control=control)
    with torch.no_grad():
        results = timed(fns, args.repeats)
    base_time = results["base"][0]
    rows = []
    for name, (med, lo, hi) in results.items():
        n = int(name.split("=")[1]) if "=" in name else 0
        rows.append({"model": name, "ms": med * 1e3, "min_ms": lo * 1e3, "max_ms": hi * 1e3,
                     "ratio": med / base_time, "expected": 1 + n / cfg.depth})
    print(f"{Path(args.model).name}: depth {cfg.depth}, hidden {cfg.hidden_size}, {side}x{side} latent, batch 2 (CFG), "
          f"{args.dtype}, {args.threads} thread(s), median of {args.repeats} interleaved")
    print_table(rows, ["model", "ms", "min_ms", "max_ms", "ratio", "expected"])
    save("controlnet_step", {"model": args.model, "depth": cfg.depth, "dtype": args.dtype, "repeats": args.repeats,
                             "rows": rows})


if __name__ == "__main__":
    main()
