"""How well a transformer predicts x0 at the noisy timesteps, with its caption and with none.

    python experiments/probes/x0_error.py runs/toy/stage2c/model.safetensors [--cache runs/toy/cache-64] [-n 64]

For N training latents and t in (999, 900, 700, 500): the MSE of the x0 the model's output implies
(as DPM-Solver++ derives it) with the sample's own short caption and with the null caption.
Predicting 0 everywhere scores the latents' mean square (printed). A caption-conditioned model
must beat that at t = 999 and beat its own null-caption score there: that is where the first
sampling step decides the layout.
"""

from __future__ import annotations

import argparse

import torch

from pixsigma.data.cache import FeatureCache, pad_captions, scale_latents
from pixsigma.diffusion.gaussian import GaussianDiffusion
from pixsigma.model import load_transformer


@torch.no_grad()
def x0_errors(model, cache: FeatureCache, n: int, timesteps=(999, 900, 700, 500), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    items = [cache.get(i) for i in cache.index[:n]]
    x0 = scale_latents(torch.stack([d["mean"].float() for d in items]), cache.vae)
    emb, mask = pad_captions([d["short"] for d in items], model.config.max_caption_tokens)
    diffusion = GaussianDiffusion(prediction_type=model.config.prediction_type)
    c = x0.shape[1]
    out = {"zero": float(x0.pow(2).mean())}
    for t_val in timesteps:
        t = torch.full((n,), t_val, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=g)
        x_t = diffusion.q_sample(x0, t, noise)
        for name, drop in (("caption", None), ("null", torch.ones(n, dtype=torch.bool))):
            pred = model(x_t, t, emb.float(), mask, force_drop_ids=drop)[:, :c].float()
            x0_hat = diffusion.predicted_x0(pred, x_t, t)
            out[f"t{t_val}_{name}"] = float((x0_hat - x0).pow(2).mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("transformer")
    p.add_argument("--cache", default="runs/toy/cache-64")
    p.add_argument("-n", type=int, default=64)
    args = p.parse_args()
    model = load_transformer(args.transformer).float().eval()
    r = x0_errors(model, FeatureCache(args.cache), args.n)
    print(f"x0 MSE, {args.n} latents ({model.config.prediction_type}); predicting 0 scores {r['zero']:.3f}")
    print("t     caption   null")
    for t in (999, 900, 700, 500):
        print(f"{t:<5} {r[f't{t}_caption']:.3f}     {r[f't{t}_null']:.3f}")


if __name__ == "__main__":
    main()
