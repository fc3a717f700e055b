"""XL_2 forward: pixsigma vs diffusers' PixArtTransformer2DModel holding the same weights.

Latent 32×32 and 64×64 (256px, 512px), batch 2 (a CFG pair), 300 caption tokens all valid
(the worst case; a typical prompt uses far fewer and pixsigma then drops the padding), run
interleaved in one process so machine noise hits both alike. Prints a table, saves JSON.

    python benchmarks/transformer_forward.py [--threads 2] [--repeats 3] [--dtypes fp32,bf16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_medians, matmul_gflops, print_table, save  # noqa: E402

from pixsigma.model.checkpoint import save_diffusers  # noqa: E402
from pixsigma.model.flops import forward_flops  # noqa: E402
from pixsigma.model.transformer import PixArtSigmaTransformer, xl2_at  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--sizes", default="32,64")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import PixArtTransformer2DModel

    peak = {name: matmul_gflops(dtype=DTYPES[name]) for name in args.dtypes.split(",")}
    rows = []
    for size in map(int, args.sizes.split(",")):
        config = xl2_at(size * 8)
        torch.manual_seed(0)
        ours = PixArtSigmaTransformer(config).eval()
        with torch.no_grad():  # the default init zeroes output layers: use random weights throughout
            for p in ours.parameters():
                p.normal_(0, 0.02)
        with tempfile.TemporaryDirectory() as tmp:
            save_diffusers(ours, Path(tmp) / "t")
            theirs = PixArtTransformer2DModel.from_pretrained(Path(tmp) / "t").eval()
        x = torch.randn(2, 4, size, size)
        t = torch.tensor([500.0, 500.0])
        y = torch.randn(2, 300, 4096)
        mask = torch.ones(2, 300)
        flops = forward_flops(config, size, size, 300, batch=2)
        for name in args.dtypes.split(","):
            dtype = DTYPES[name]
            ours.to(dtype)
            theirs.to(dtype)
            xd, yd = x.to(dtype), y.to(dtype)
            added = {"resolution": None, "aspect_ratio": None}

            @torch.no_grad()
            def run_ours():
                return ours(xd, t, yd, mask)

            @torch.no_grad()
            def run_theirs():
                return theirs(xd, encoder_hidden_states=yd, encoder_attention_mask=mask, timestep=t,
                              added_cond_kwargs=added).sample

            err = (run_ours().float() - run_theirs().float()).abs().max().item()
            times = interleaved_medians({"ours": run_ours, "diffusers": run_theirs}, repeats=args.repeats)
            rows.append({
                "latent": f"{size}x{size}", "px": size * 8, "dtype": name, "ours_s": times["ours"],
                "diffusers_s": times["diffusers"], "ratio": times["ours"] / times["diffusers"],
                "ours_gflops": flops / times["ours"] / 1e9, "matmul_peak_gflops": peak[name],
                "tflop_per_forward": flops / 1e12, "max_abs_diff": err,
            })
            print_table(rows[-1:], list(rows[-1]))
        del ours, theirs
    print()
    print_table(rows, list(rows[0]))
    save("transformer_forward", {"rows": rows, "batch": 2, "caption_tokens": 300, "threads": args.threads})


if __name__ == "__main__":
    main()
