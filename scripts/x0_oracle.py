"""How much of a single-object latent a caption can predict, against what the model predicts.

    python scripts/x0_oracle.py [TRANSFORMER] [--cache runs/toy/cache-64] [--data runs/toy/data/data_info.json]

For the single-object images of a toy dataset (its data_info.json, indexed like the cache): the
MSE of the leave-one-out mean latent of the images that share the object's attributes (color and
cell; plus shape, size, background), a nonparametric stand-in for E[x0 | what the caption says]
(noisy where the groups are small); then the model's x0 MSE at t = 999 / 700 / 500 on 256 of
those latents with their short and their long caption (as scripts/x0_error.py derives it).
"""

from __future__ import annotations

import argparse
import collections
import json

import torch

from pixsigma.data.cache import FeatureCache, pad_captions, scale_latents
from pixsigma.diffusion.gaussian import GaussianDiffusion
from pixsigma.model import load_transformer
from pixsigma.pipeline import default_model_dir

GROUPINGS = {  # name -> the object/scene attributes a group shares
    "color, cell": ("color", "cell"),
    "color, cell, shape": ("color", "cell", "shape"),
    "color, cell, shape, size": ("color", "cell", "shape", "size_name"),
    "color, cell, shape, size, background": ("color", "cell", "shape", "size_name", "background"),
}


def group_mean_mse(x0: torch.Tensor, scenes: list[dict], keys: tuple[str, ...]) -> tuple[float, int]:
    """Leave-one-out group-mean MSE over the samples in groups of at least 2, and the group count."""
    def key(scene):
        obj = scene["objects"][0]
        return tuple(scene[k] if k == "background" else obj[k] for k in keys)
    groups = collections.defaultdict(list)
    for j, scene in enumerate(scenes):
        groups[key(scene)].append(j)
    err, n = 0.0, 0
    for members in groups.values():
        if len(members) < 2:
            continue
        xs = x0[members]
        loo = (xs.sum(0, keepdim=True) - xs) / (len(members) - 1)
        err += float((loo - xs).pow(2).mean(dim=(1, 2, 3)).sum())
        n += len(members)
    return err / max(n, 1), len(groups)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("transformer", nargs="?", default=str(default_model_dir() / "transformer" / "model.safetensors"))
    p.add_argument("--cache", default="runs/toy/cache-64")
    p.add_argument("--data", default="runs/toy/data/data_info.json")
    p.add_argument("-n", type=int, default=256, help="latents the model is scored on")
    args = p.parse_args()
    records = json.load(open(args.data))
    cache = FeatureCache(args.cache)
    idx = [i for i, r in enumerate(records) if len(r["scene"]["objects"]) == 1]
    items = [cache.get(i) for i in idx]
    scenes = [records[i]["scene"] for i in idx]
    x0 = scale_latents(torch.stack([d["mean"].float() for d in items]), cache.vae)
    print(f"{len(idx)} single-object latents; predicting 0 scores {float(x0.pow(2).mean()):.3f}")
    for name, keys in GROUPINGS.items():
        mse, groups = group_mean_mse(x0, scenes, keys)
        print(f"leave-one-out mean of the same {name}: {mse:.3f} ({groups} groups)")

    model = load_transformer(args.transformer).float().eval()
    diffusion = GaussianDiffusion(prediction_type=model.config.prediction_type)
    sel = list(range(0, len(idx), max(1, len(idx) // args.n)))[: args.n]
    g = torch.Generator().manual_seed(0)
    captions = {kind: pad_captions([items[j][kind] for j in sel], model.config.max_caption_tokens) for kind in ("short", "long")}
    c = x0.shape[1]
    print(f"model x0 MSE on {len(sel)} of them:")
    for t_val in (999, 700, 500):
        t = torch.full((len(sel),), t_val, dtype=torch.long)
        x_t = diffusion.q_sample(x0[sel], t, torch.randn(x0[sel].shape, generator=g))
        row = []
        for kind, (emb, mask) in captions.items():
            pred = model(x_t, t, emb.float(), mask)[:, :c].float()
            row.append(f"{kind} {float((diffusion.predicted_x0(pred, x_t, t) - x0[sel]).pow(2).mean()):.3f}")
        print(f"t = {t_val}: " + ", ".join(row))


if __name__ == "__main__":
    main()
