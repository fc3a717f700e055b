"""XL_2 forward at 512px in fp32 vs bf16 (weights and activations), attention in bf16 or fp32,
the residual stream in fp32 (the default with half-precision weights) or in bf16.

Reports the time ratio against fp32 and the output error: relative L2 of the bf16 output
against the fp32 one, same weights (random, std 0.02), batch 2 (a CFG pair), 300 caption tokens.

    python benchmarks/precision.py [--threads 2] [--repeats 3] [--latent 64]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_medians, print_table, save  # noqa: E402

from pixsigma.model.transformer import PixArtSigmaTransformer, xl2_at  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512px)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fp32 = PixArtSigmaTransformer(xl2_at(args.latent * 8)).eval()
    with torch.no_grad():
        for p in fp32.parameters():
            p.normal_(0, 0.02)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    bf16_attn32 = copy.deepcopy(bf16)
    bf16_attn32.set_runtime_options(attention_fp32=True)
    bf16_plain = copy.deepcopy(bf16)
    bf16_plain.set_runtime_options(residual_fp32=False)  # everything in bf16, the residual stream too
    x = torch.randn(2, 4, args.latent, args.latent)
    t = torch.tensor([500.0, 500.0])
    y = torch.randn(2, 300, 4096)
    models = {"fp32": fp32, "bf16 (fp32 residual, default)": bf16, "bf16 + fp32 attention": bf16_attn32,
              "bf16, bf16 residual": bf16_plain}
    contexts = {k: m.prepare_caption(y.to(m.x_embedder.proj.weight.dtype)) for k, m in models.items()}
    fns = {k: (lambda m=m, c=contexts[k]: m(x, t, c)) for k, m in models.items()}
    with torch.no_grad():
        ref = fns["fp32"]().float()
        errors = {k: ((fn().float() - ref).norm() / ref.norm()).item() for k, fn in fns.items()}
        times = interleaved_medians(fns, repeats=args.repeats)
    rows = [{"precision": k, "seconds": times[k], "speedup_vs_fp32": times["fp32"] / times[k], "relative_l2": errors[k]}
            for k in models]
    print_table(rows, list(rows[0]))
    save("precision", {"rows": rows, "latent": args.latent, "threads": args.threads})


if __name__ == "__main__":
    main()
