"""From which noise level a transformer keeps an object's shape: SDEdit on true latents.

    python experiments/probes/sdedit_shape.py [runs/toy/stage3c/model.safetensors] [-n 48]

Renders N single-object scenes (medium and large objects) with their own short captions, encodes
them with the shipped VAE, noises each latent to the first step t <= START of the 20-step
DPM-Solver++ grid and denoises from there (true caption, guidance 4.5). A start of 999 is plain
generation; the lower the start, the more of the true shape x_t still carries. Prints how many
decoded images the evaluator reads as exactly one object of the asked shape.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from pixsigma.diffusion.samplers import make_scheduler
from pixsigma.pipeline import SigmaPipeline, guided_model_fn
from pixsigma.toy import evaluate as E
from pixsigma.toy.render import render, sample_scene

STARTS = (999, 800, 700, 600, 500, 400, 300, 200)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("transformer", nargs="?", default=None, help="a transformer checkpoint (default: the shipped one)")
    p.add_argument("-n", type=int, default=48)
    p.add_argument("--cfg", type=float, default=4.5)
    args = p.parse_args()
    pipe = SigmaPipeline.from_pretrained(None, transformer=args.transformer)
    scenes, i = [], 0
    while len(scenes) < args.n:
        scene = sample_scene(np.random.default_rng([99, i]), kind="single")
        i += 1
        if scene.objects[0].size_name != "small":
            scenes.append(scene)
    images = torch.stack([torch.from_numpy(np.asarray(render(s, 64), dtype=np.float32) / 255.0).permute(2, 0, 1) for s in scenes])
    x0 = pipe.vae.encode(images)
    c = x0.shape[1]
    length = pipe.text_encoder.max_length
    emb, mask = pipe.text_encoder.encode([s.short_caption for s in scenes], length)
    neg, neg_mask = pipe.text_encoder.encode([""] * len(scenes), length)
    context = pipe.transformer.prepare_caption(torch.cat([neg, emb]), torch.cat([neg_mask, mask]))
    model_fn = guided_model_fn(pipe.transformer, context, args.cfg, c)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    print(f"SDEdit from true latents, {args.n} single objects, cfg {args.cfg}: shape read right")
    for start in STARTS:
        scheduler = make_scheduler("dpm-solver", pipe.scheduler_config, pipe.prediction_type)
        scheduler.set_timesteps(20)
        first = int((scheduler.timesteps > start).sum())
        steps = scheduler.timesteps[first:]
        x = noise if first == 0 else scheduler.add_noise(x0, noise, steps[:1])
        scheduler.set_begin_index(first)
        for t in steps:
            out = model_fn(scheduler.scale_model_input(x, t), t)
            x = scheduler.step(out[:, :c].float(), t, x, return_dict=False)[0]
        decoded = pipe.vae.decode(x).permute(0, 2, 3, 1).numpy()
        right = 0
        for img, scene in zip(decoded, scenes):
            found = E.detect_objects((img * 255).round().astype(np.uint8))
            right += int(len(found) == 1 and found[0].shape == scene.objects[0].shape)
        print(f"  from t = {int(steps[0]):3d} (step {first:2d} of 20): {right}/{args.n}", flush=True)


if __name__ == "__main__":
    main()
