"""Time per image of the XL model: LCM at 4 steps (no guidance) against DPM-Solver++ at 20 steps
with classifier-free guidance, in the same run.

Random XL_2 weights in bf16 with KV compression (conv, R = 2, the deep half of the blocks), a
300-token caption (20 valid) of random T5-sized embeddings, and a random SDXL-shaped VAE for the
decode; the text encoder is left out (it runs once per prompt for either sampler). Interleaved
repeats, median and spread.

    python benchmarks/lcm_xl.py --resolution 1024 --device cuda      # the measurement
    python benchmarks/lcm_xl.py --resolution 256 --depth 2           # a quick check on a CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import interleaved_times, save  # noqa: E402
from pixsigma.diffusion.samplers import sample  # noqa: E402
from pixsigma.model.transformer import XL_2, KVCompressConfig, PixArtSigmaTransformer, deep_half  # noqa: E402


def build(depth: int, resolution: int, device: str):
    config = XL_2.with_(depth=depth, sample_size=resolution // 8, pe_interpolation=resolution / 512,
                        kv_compress=KVCompressConfig("conv", 2, deep_half(depth)))
    torch.manual_seed(0)
    model = PixArtSigmaTransformer(config)
    for p in model.parameters():  # the default init zeroes the output layer; random weights everywhere
        torch.nn.init.normal_(p, std=0.02)
    return model.to(device=device, dtype=torch.bfloat16).eval()


def vae_decoder(device: str):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
    return vae.to(device=device, dtype=torch.bfloat16).eval()


def one_image(model, vae, caption, mask, null, resolution: int, sampler: str, steps: int, guidance: float, device: str):
    """One image's denoising (and, with a VAE, its decode)."""
    latents = torch.randn(1, 4, resolution // 8, resolution // 8, generator=torch.Generator().manual_seed(0)).to(device)

    def denoise(x, t):
        t = t.expand(x.shape[0]).to(device)
        if guidance == 1.0:
            return model(x.to(torch.bfloat16), t, caption, mask)[:, :4].float()
        out = model(torch.cat([x, x]).to(torch.bfloat16), torch.cat([t, t]), torch.cat([null, caption]), torch.cat([mask, mask]))
        uncond, cond = out[:, :4].float().chunk(2)
        return uncond + guidance * (cond - uncond)

    with torch.no_grad():
        image = sample(denoise, latents, sampler=sampler, steps=steps)
        if vae is not None:
            image = vae.decode(image.to(torch.bfloat16) / 0.13025).sample
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=28)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-decode", action="store_true", help="time the denoising alone (no VAE decode)")
    args = parser.parse_args()
    dev, res = args.device, args.resolution
    model, vae = build(args.depth, res, dev), (None if args.no_decode else vae_decoder(dev))
    g = torch.Generator().manual_seed(1)
    caption = torch.randn(1, 300, 4096, generator=g).to(dev, torch.bfloat16)
    mask = (torch.arange(300) < 20).long()[None].to(dev)
    null = model.y_embedder.y_embedding[None, :300].to(dev, torch.bfloat16)  # the null caption, as CFG uses it
    runs = {"dpm-solver++ 20 steps, CFG 4.5": lambda: one_image(model, vae, caption, mask, null, res, "dpm-solver", 20, 4.5, dev),
            "lcm 4 steps, no CFG": lambda: one_image(model, vae, caption, mask, null, res, "lcm", 4, 1.0, dev)}
    times = interleaved_times(runs, repeats=args.repeats)
    base = statistics.median(times["dpm-solver++ 20 steps, CFG 4.5"])
    rows = []
    what = "denoising only" if args.no_decode else "denoising + VAE decode"
    print(f"XL (depth {args.depth}) at {res}px on {dev}, bf16 + KV compression, {what}; seconds per image, median of {args.repeats}")
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"run": name, "median_s": med, "min_s": min(ts), "max_s": max(ts), "speedup_vs_dpm20": base / med})
        print(f"  {name:32s} {med:8.3f} s  ({min(ts):.3f}-{max(ts):.3f})  speed-up {base / med:5.2f}x")
    name = f"lcm_xl_{res}_{dev.split(':')[0]}" + ("_denoise" if args.no_decode else "")
    save(name, {"resolution": res, "depth": args.depth, "device": dev, "decode": not args.no_decode, "rows": rows})


if __name__ == "__main__":
    main()
