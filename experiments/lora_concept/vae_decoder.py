"""The shipped toy VAE decodes only its training palette: an unseen color such as lime comes back
as red or orange (round-trip error up to ~200 RGB units). This fine-tunes the decoder alone
(encoder, latents and scaling factor unchanged, so the feature cache and the LoRA stay valid) on
toy scenes of which half carry lime, then reports the round-trip color error per color.

    python experiments/lora_concept/vae_decoder.py runs/lora_concept/vae_lime [--steps 600]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from pixsigma.pipeline import DEFAULT_MODEL_DIR
from pixsigma.toy import prompts as P
from pixsigma.toy.render import generate
from pixsigma.train.vae import VAETrainConfig, train_vae
from pixsigma.vae import VAE


def round_trip_errors(vae: VAE) -> dict:
    """Max-over-backgrounds error (RGB units) of a decoded square's mean color, per color."""
    out = {}
    for name, rgb in P.ALL_COLORS.items():
        errs = []
        for bg in P.BACKGROUNDS.values():
            img = np.zeros((64, 64, 3), np.float32) + np.array(bg, np.float32)
            img[20:44, 20:44] = rgb
            x = torch.from_numpy(img).permute(2, 0, 1)[None] / 255
            rec = vae.decode(vae.encode(x))[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255
            errs.append(float(np.abs(rec[26:38, 26:38].mean((0, 1)) - np.array(rgb)).max()))
        out[name] = round(max(errs), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=2e-4)
    args = ap.parse_args()
    base = DEFAULT_MODEL_DIR / "vae"
    print("shipped decoder:", round_trip_errors(VAE(base)))
    images = (img for img, *_ in generate(None, seed=31, new_color="lime", new_color_share=0.5, start=10**6))
    config = VAETrainConfig(steps=args.steps, lr=args.lr, decoder_only=True, save_every=args.steps, seed=31)
    train_vae(args.out, images, config, init_from=base)
    print("fine-tuned decoder:", round_trip_errors(VAE(args.out)))


if __name__ == "__main__":
    main()
