"""KV token compression: measured speed-up against the FLOP-predicted one, 1K to 4K.

One XL_2-width block (hidden 1152, 16 heads, 300 caption tokens, caption K/V precomputed as in
sampling) at the token grids of 1024px, 2K and (with --full) 4K square images, uncompressed vs
compressed (conv / ave / uniform, R=2). Then the 28-layer model with the deep half compressed:
projected from the per-block times (14 plain + 14 compressed blocks) and, at 1024px, measured
directly (--measure-model). Prints tables, saves JSON.

    python benchmarks/kv_compress.py [--full] [--dtype fp32|bf16] [--threads 2] [--measure-model]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_medians, print_table, save  # noqa: E402

from pixsigma.model.flops import block_flops, forward_flops  # noqa: E402
from pixsigma.model.transformer import KVCompressConfig, PixArtBlock, PixArtSigmaTransformer, deep_half, xl2_at  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GRIDS = {"1024px": 64, "2K": 128, "4K": 256}  # token grid side (latent / patch 2)


def block(config, operator=None):
    cfg = config if operator is None else config.with_(kv_compress=KVCompressConfig(operator, 2, (0,)))
    torch.manual_seed(0)
    b = PixArtBlock(cfg, 0).eval()
    with torch.no_grad():
        for p in b.parameters():
            p.normal_(0, 0.02)
    return b


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="include 4K (65,536 tokens; minutes per run)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure-model", action="store_true", help="also time the whole XL_2 at 1024px")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    config = xl2_at(1024)
    d, L = config.hidden_size, 300
    operators = ["conv", "ave", "uniform"]
    blocks = {None: block(config).to(dtype), **{op: block(config, op).to(dtype) for op in operators}}
    y = torch.randn(1, L, d, dtype=dtype)
    rows, per_block = [], {}
    grids = {k: v for k, v in GRIDS.items() if args.full or k != "4K"}
    for name, side in grids.items():
        x = torch.randn(1, side * side, d, dtype=dtype)
        t6 = torch.randn(1, 6 * d, dtype=dtype)
        fns = {}
        for op, b in blocks.items():
            caption_kv = b.cross_attn.caption_kv(y)
            fns[op or "none"] = (lambda b=b, ckv=caption_kv: b(x, t6, ckv, None, (side, side)))
        times = interleaved_medians(fns, repeats=args.repeats)
        base_flops = block_flops(config, side, side, L, 1, include_caption_kv=False)
        per_block[name] = times
        for op in operators:
            flops = block_flops(config, side, side, L, 2, include_caption_kv=False)
            predicted = base_flops / flops
            measured = times["none"] / times[op]
            rows.append({"size": name, "tokens": side * side, "operator": op, "plain_s": times["none"], "compressed_s": times[op],
                         "plain_gflop": base_flops / 1e9, "compressed_gflop": flops / 1e9, "predicted_speedup": predicted,
                         "measured_speedup": measured, "of_predicted": measured / predicted})
        print_table(rows[-3:], list(rows[-1]))
    print("\nper block (one XL_2-width block, batch 1):")
    print_table(rows, list(rows[0]))

    # The whole model: 14 plain + 14 compressed (conv) blocks, projected from the block timings.
    model_rows = []
    compressed = KVCompressConfig("conv", 2, deep_half(28))
    for name, side in grids.items():
        t = per_block[name]
        plain, mixed = 28 * t["none"], 14 * t["none"] + 14 * t["conv"]
        f_plain = forward_flops(config, 2 * side, 2 * side, L, include_caption_kv=False)
        f_mixed = forward_flops(config.with_(kv_compress=compressed), 2 * side, 2 * side, L, include_caption_kv=False)
        model_rows.append({"size": name, "how": "projected from blocks", "plain_s": plain, "deep_half_conv_s": mixed,
                           "saving": 1 - mixed / plain, "flop_saving": 1 - f_mixed / f_plain})
    if args.measure_model:
        side = GRIDS["1024px"]
        torch.manual_seed(0)
        plain_model = PixArtSigmaTransformer(config).eval()
        with torch.no_grad():
            for p in plain_model.parameters():
                p.normal_(0, 0.02)
        from pixsigma.model.transitions import add_kv_compression

        comp_model = add_kv_compression(plain_model).eval().to(dtype)
        plain_model = plain_model.to(dtype)
        x = torch.randn(1, 4, 2 * side, 2 * side, dtype=dtype)
        ctx_p = plain_model.prepare_caption(torch.randn(1, L, 4096, dtype=dtype))
        ctx_c = comp_model.prepare_caption(torch.randn(1, L, 4096, dtype=dtype))
        t = torch.tensor([500.0])
        with torch.no_grad():
            times = interleaved_medians({"plain": lambda: plain_model(x, t, ctx_p), "conv": lambda: comp_model(x, t, ctx_c)},
                                        repeats=args.repeats)
        f_plain = forward_flops(config, 2 * side, 2 * side, L, include_caption_kv=False)
        f_mixed = forward_flops(comp_model.config, 2 * side, 2 * side, L, include_caption_kv=False)
        model_rows.append({"size": "1024px", "how": "measured", "plain_s": times["plain"], "deep_half_conv_s": times["conv"],
                           "saving": 1 - times["conv"] / times["plain"], "flop_saving": 1 - f_mixed / f_plain})
    print("\nwhole XL_2 (28 blocks, deep half compressed with conv R=2), batch 1:")
    print_table(model_rows, list(model_rows[0]))
    save(f"kv_compress_{args.dtype}", {"blocks": rows, "model": model_rows, "threads": args.threads, "dtype": args.dtype})


if __name__ == "__main__":
    main()
