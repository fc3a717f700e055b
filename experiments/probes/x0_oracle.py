"""How much of a single-object latent a caption can predict, against what the model predicts.

    python experiments/probes/x0_oracle.py [TRANSFORMER] [--cache runs/toy/cache-64] [--data runs/toy/data/data_info.json]
                                [--grid x0.png]

For the single-object images of a toy dataset (its data_info.json, indexed like the cache): the
MSE of the leave-one-out mean latent of the images that share the object's attributes (color and
cell; plus shape, size, background), a nonparametric stand-in for E[x0 | what the caption says]
(noisy where the groups are small); then the model's x0 MSE at t = 999 / 700 / 500 on 256 of
those latents with their short and their long caption (as experiments/probes/x0_error.py derives it).
--grid saves what those x0 predictions look like: 2 large objects per shape (columns), the true
image then the decoded x0 at t = 999 / 700 / 500 / 300 with the long caption (rows).
"""

from __future__ import annotations

import argparse
import collections
import json

import torch

from pixsigma.data.cache import FeatureCache, load_vae, pad_captions, scale_latents
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


def latents(cache: FeatureCache, ids: list[int]) -> tuple[list[dict], torch.Tensor]:
    items = [cache.get(i) for i in ids]
    return items, scale_latents(torch.stack([d["mean"].float() for d in items]), cache.vae)


def predict_x0(model, diffusion, x0: torch.Tensor, t_val: int, emb, mask, g: torch.Generator):
    """Noise x0 to t_val and return the model's x0 estimate (as DPM-Solver++ derives it)."""
    t = torch.full((x0.shape[0],), t_val, dtype=torch.long)
    x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    return diffusion.predicted_x0(model(x_t, t, emb.float(), mask)[:, : x0.shape[1]].float(), x_t, t)


@torch.no_grad()
def save_grid(path, model, diffusion, cache: FeatureCache, records: list[dict], vae_dir) -> None:
    from PIL import Image

    from pixsigma.toy.prompts import SHAPES

    chosen = {shape: [] for shape in SHAPES}
    for i, r in enumerate(records):
        objs = r["scene"]["objects"]
        if len(objs) == 1 and objs[0]["size_name"] == "large" and len(chosen[objs[0]["shape"]]) < 2:
            chosen[objs[0]["shape"]].append(i)
    idx = [i for ids in chosen.values() for i in ids]
    items, x0 = latents(cache, idx)
    emb, mask = pad_captions([d["long"] for d in items], model.config.max_caption_tokens)
    g = torch.Generator().manual_seed(0)
    rows = [x0] + [predict_x0(model, diffusion, x0, t_val, emb, mask, g) for t_val in (999, 700, 500, 300)]
    vae = load_vae(vae_dir)
    cell = 96
    grid = Image.new("RGB", (len(idx) * cell, len(rows) * cell))
    for r, z in enumerate(rows):
        pixels = vae.decode(z / cache.vae["scaling_factor"] + cache.vae["shift_factor"]).sample.clamp(-1, 1)
        for k, img in enumerate(((pixels + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()):
            grid.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (k * cell, r * cell))
    grid.save(path)
    print(f"saved {path}: columns {', '.join(s for s, ids in chosen.items() for _ in ids)}")


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("transformer", nargs="?", default=str(default_model_dir() / "transformer" / "model.safetensors"))
    p.add_argument("--cache", default="runs/toy/cache-64")
    p.add_argument("--data", default="runs/toy/data/data_info.json")
    p.add_argument("-n", type=int, default=256, help="latents the model is scored on")
    p.add_argument("--grid", default=None, help="also save decoded x0 predictions here (PNG)")
    p.add_argument("--vae", default=str(default_model_dir() / "vae"), help="VAE for --grid")
    args = p.parse_args()
    records = json.load(open(args.data))
    cache = FeatureCache(args.cache)
    idx = [i for i, r in enumerate(records) if len(r["scene"]["objects"]) == 1]
    items, x0 = latents(cache, idx)
    scenes = [records[i]["scene"] for i in idx]
    print(f"{len(idx)} single-object latents; predicting 0 scores {float(x0.pow(2).mean()):.3f}")
    for name, keys in GROUPINGS.items():
        mse, groups = group_mean_mse(x0, scenes, keys)
        print(f"leave-one-out mean of the same {name}: {mse:.3f} ({groups} groups)")

    model = load_transformer(args.transformer).float().eval()
    diffusion = GaussianDiffusion(prediction_type=model.config.prediction_type)
    sel = list(range(0, len(idx), max(1, len(idx) // args.n)))[: args.n]
    g = torch.Generator().manual_seed(0)
    captions = {kind: pad_captions([items[j][kind] for j in sel], model.config.max_caption_tokens) for kind in ("short", "long")}
    print(f"model x0 MSE on {len(sel)} of them:")
    for t_val in (999, 700, 500):
        row, state = [], g.get_state()
        for kind, (emb, mask) in captions.items():
            g.set_state(state)  # the same noise for both captions
            err = (predict_x0(model, diffusion, x0[sel], t_val, emb, mask, g) - x0[sel]).pow(2).mean()
            row.append(f"{kind} {float(err):.3f}")
        print(f"t = {t_val}: " + ", ".join(row))
    if args.grid:
        save_grid(args.grid, model, diffusion, cache, records, args.vae)


if __name__ == "__main__":
    main()
