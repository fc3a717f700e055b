"""One float32 Linear layer on CPU: oneDNN on a weight reordered once (what
`pixsigma.model.transformer.onednn_linears` sets up for a pipeline call) against F.linear (torch's
BLAS), at the XL_2 layer shapes, plus the machine's matmul rate through each. Times interleaved,
median of --repeats with the spread.

    python benchmarks/onednn_linear.py [--threads 1] [--repeats 9]

Writes a table to stdout and JSON to benchmarks/results/onednn_linear.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_times, machine, print_table, save  # noqa: E402

SHAPES = {  # name: (tokens, in, out); 512 tokens = a CFG pair of 256px images, 2048 = one pair at 512px
    "qkv 512x1152->3456": (512, 1152, 3456),
    "proj 512x1152->1152": (512, 1152, 1152),
    "fc1 512x1152->4608": (512, 1152, 4608),
    "fc2 512x4608->1152": (512, 4608, 1152),
    "fc1 2048x1152->4608": (2048, 1152, 4608),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (n, k, m) in SHAPES.items():
        x, w, b = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g), torch.randn(m, generator=g)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        times = interleaved_times({"F.linear": lambda: F.linear(x, w, b),
                                   "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")},
                                  repeats=args.repeats, warmup=2)
        ratios = [o / f for o, f in zip(times["onednn"], times["F.linear"])]
        flops = 2 * n * k * m
        diff = (torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "") - F.linear(x, w, b)).abs().max().item()
        rows.append({"layer": name, "F.linear_ms": 1e3 * statistics.median(times["F.linear"]),
                     "onednn_ms": 1e3 * statistics.median(times["onednn"]), "ratio": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "F.linear_GFLOPs": flops / statistics.median(times["F.linear"]) / 1e9,
                     "onednn_GFLOPs": flops / statistics.median(times["onednn"]) / 1e9, "max_abs_diff": diff})
    print(f"{machine()}, {args.threads} thread(s), median of {args.repeats} interleaved repeats")
    print_table(rows, list(rows[0]))
    save("onednn_linear", {"machine": machine(), "threads": args.threads, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
