"""How much a transformer's x0 prediction relies on the shape word and on the color word.

    python experiments/probes/caption_swap.py runs/toy/stage3c/model.safetensors [-n 64]

Renders N single-object scenes (medium and large objects), encodes them with the shipped VAE,
noises them to t in (200 ... 600) and measures the MSE of the x0 the model implies with the true
caption "a <color> <shape>", with another shape named and with another color named. A model that
reads a word loses accuracy when the word is wrong; how much it loses is how much it relies on it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from pixsigma.diffusion.gaussian import GaussianDiffusion
from pixsigma.pipeline import SigmaPipeline
from pixsigma.toy import prompts as P
from pixsigma.toy.render import render, sample_scene


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("transformer")
    p.add_argument("-n", type=int, default=64)
    args = p.parse_args()
    pipe = SigmaPipeline.from_pretrained(None, transformer=args.transformer)
    model = pipe.transformer.float().eval()
    rng = np.random.default_rng(0)
    captions: dict[str, list[str]] = {"true": [], "other shape": [], "other color": []}
    images = []
    while len(images) < args.n:
        scene = sample_scene(rng, kind="single")
        o = scene.objects[0]
        if o.size_name == "small":
            continue
        shape = [s for s in P.SHAPES if s != o.shape][int(rng.integers(len(P.SHAPES) - 1))]
        color = [c for c in P.COLOR_NAMES if c != o.color][int(rng.integers(len(P.COLOR_NAMES) - 1))]
        captions["true"].append(f"a {o.color} {o.shape}")
        captions["other shape"].append(f"a {o.color} {shape}")
        captions["other color"].append(f"a {color} {o.shape}")
        images.append(np.asarray(render(scene, 64), dtype=np.float32) / 255.0)  # VAE.encode takes [0, 1]
    x0 = pipe.vae.encode(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
    diffusion = GaussianDiffusion(prediction_type=model.config.prediction_type)
    context = {k: pipe.text_encoder.encode(v, model.config.max_caption_tokens) for k, v in captions.items()}
    g = torch.Generator().manual_seed(0)
    print(f"x0 MSE, {args.n} single-object latents: " + " / ".join(captions))
    for t_val in (200, 300, 400, 500, 600):
        t = torch.full((args.n,), t_val)
        x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        row = []
        for emb, mask in context.values():
            pred = model(x_t, t, emb.float(), mask)[:, : x0.shape[1]]
            row.append(float((diffusion.predicted_x0(pred, x_t, t) - x0).pow(2).mean()))
        print(f"t = {t_val}: " + " / ".join(f"{v:.4f}" for v in row))


if __name__ == "__main__":
    main()
