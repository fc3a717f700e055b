"""How much a transformer's x0 prediction depends on the shape word of the caption.

    python experiments/probes/shape_word_sensitivity.py MODEL.safetensors

32 clean single-object renders (4 shapes × 4 colors × 4 cells, size 0.35, white background)
are encoded with the shipped VAE and noised to t; the model predicts x0 with the true caption
("a red circle in the center") and with the shape word swapped for each other shape. Printed
per t: the x0 MSE with the true caption and with the swapped ones, how often the true caption
beats all three swaps, and the mean square difference between the predictions. A model that
draws the shape it is asked for must beat the swaps clearly where the layout is decided.
"""

import sys

import numpy as np
import torch

from pixsigma.diffusion.gaussian import GaussianDiffusion
from pixsigma.pipeline import SigmaPipeline
from pixsigma.toy.render import Scene, SceneObject, render

SHAPES = ["circle", "square", "triangle", "cross"]
COLORS = ["red", "blue", "green", "yellow"]
CELLS = [(0.5, 0.5, "in the center"), (0.2, 0.2, "at the top left"), (0.8, 0.8, "at the bottom right"), (0.8, 0.2, "at the top right")]


@torch.no_grad()
def main() -> None:
    pipe = SigmaPipeline.from_pretrained(None, transformer=sys.argv[1])
    model = pipe.transformer.float().eval()
    scenes = [(SHAPES[i % 4], COLORS[(i // 4) % 4], *CELLS[(i // 16) * 2 + i % 2]) for i in range(32)]
    images = [render(Scene(objects=[SceneObject(s, c, x, y, 0.35)], background="white"), 64) for s, c, x, y, _ in scenes]
    x0 = pipe.vae.encode(torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1) for im in images]))
    diffusion = GaussianDiffusion(prediction_type=model.config.prediction_type)
    length = model.config.max_caption_tokens
    true = pipe.text_encoder.encode([f"a {c} {s} {p}" for s, c, _, _, p in scenes], length)
    swaps = [pipe.text_encoder.encode([f"a {c} {SHAPES[(SHAPES.index(s) + k) % 4]} {p}" for s, c, _, _, p in scenes], length)
             for k in (1, 2, 3)]
    g = torch.Generator().manual_seed(1)
    print("t    err(true)  err(swapped)  true beats all swaps  |x0(true) - x0(swap)|^2")
    for t_val in (900, 700, 600, 500, 400, 300, 200):
        t = torch.full((32,), t_val)
        x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g))

        def predict(caption):
            out = model(x_t, t, caption[0].float(), caption[1])[:, : x0.shape[1]]
            return diffusion.predicted_x0(out, x_t, t)

        p_true, p_swaps = predict(true), [predict(c) for c in swaps]
        e_true = (p_true - x0).pow(2).flatten(1).mean(1)
        e_swaps = torch.stack([(p - x0).pow(2).flatten(1).mean(1) for p in p_swaps])
        diff = torch.stack([(p - p_true).pow(2).flatten(1).mean(1) for p in p_swaps]).mean()
        wins = (e_true[None] < e_swaps).all(0).float().mean()
        print(f"{t_val:<4} {e_true.mean():.4f}     {e_swaps.mean():.4f}        {wins:.3f}                 {diff:.4f}")


if __name__ == "__main__":
    main()
