"""Why CAME with 2 data-parallel ranks differs from 1 process while AdamW agrees.

Emulates one step's gradient both ways in one process (the global batch of 4 at once, and the
mean of two halves of 2, which is what the all-reduce computes), then runs the optimizer on both
and reports the largest weight difference per parameter after N steps. With `--freeze-key-bias`
the key biases' gradients (zero in exact arithmetic: softmax ignores a shift shared by all keys)
are set to zero in both runs.
"""
import argparse
import copy
import sys

import torch
from came_pytorch import CAME

from pixsigma.model.transformer import PRESETS, PixArtSigmaTransformer

ap = argparse.ArgumentParser()
ap.add_argument("--opt", default="came")
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--freeze-key-bias", action="store_true")
a = ap.parse_args()
torch.manual_seed(0)
model = PixArtSigmaTransformer(PRESETS["tiny"]).train()
models = [model, copy.deepcopy(model)]
make = (lambda p: CAME(p, lr=1e-3, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16))) if a.opt == "came" else \
    (lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=False))
opts = [make(m.parameters()) for m in models]
d = model.config.hidden_size


def key_bias_grad_to_zero(m):
    for blk in m.blocks:
        blk.attn.qkv.bias.grad[d:2 * d] = 0
        blk.cross_attn.kv_linear.bias.grad[:d] = 0


g = torch.Generator().manual_seed(1)
for step in range(a.steps):
    x = torch.randn(4, 4, 16, 16, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    cap = torch.randn(4, 16, 32, generator=g)
    target = torch.randn(4, 8, 16, 16, generator=g)
    for i, (m, opt) in enumerate(zip(models, opts)):
        opt.zero_grad()
        parts = [slice(0, 4)] if i == 0 else [slice(0, 2), slice(2, 4)]
        for s in parts:
            loss = ((m(x[s], t[s], cap[s], force_drop_ids=torch.zeros(len(t[s]), dtype=torch.bool)) - target[s]) ** 2).mean() / len(parts)
            loss.backward()
        if a.freeze_key_bias:
            key_bias_grad_to_zero(m)
        opt.step()
diffs = {k: (p - q).abs().max().item() for (k, p), q in zip(models[0].named_parameters(), models[1].parameters())}
out = torch.stack([m.eval()(x, t, cap) for m in models])
print(f"{a.opt} steps={a.steps} freeze_key_bias={a.freeze_key_bias}: max weight diff {max(diffs.values()):.3g}; "
      f"max output diff {(out[0] - out[1]).abs().max().item():.3g}")
for k, v in sorted(diffs.items(), key=lambda kv: -kv[1])[:5]:
    print(f"  {k:40s} {v:.3g}")
