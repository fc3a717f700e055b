"""CPU training speed of the shipped toy model: each fast path against the code it replaced.

Three changes made a toy training step (64px, 16×16 latents → 256 tokens, batch 24, bf16
autocast) about twice as fast on 2 CPU cores; each is timed against its baseline in this run:

1. attention: half-precision attention on CPU over short sequences as two matmuls instead of
   torch's fused kernel (`pixsigma.model.transformer.cpu_matmul_attention`, used below
   `CPU_MATMUL_ATTENTION_MAX_SCORES`), forward + backward at the toy model's three shapes
   (256 tokens; 64 KV-compressed keys; 80 caption keys with a padding mask);
2. kv-conv: the depthwise R×R stride-R compression conv as R² window multiply-adds
   (`pixsigma.model.transformer.depthwise_window_conv`) instead of the conv kernel (forward +
   backward, K and V of a batch: 48 × 256 tokens × 256 channels);
3. cache: a shuffled batch of 24 samples read from a feature cache by opening shards lazily
   (one tensor at a time) instead of loading whole shards into a 4-shard LRU;
and the full training step (forward, backward, AdamW) of the shipped model on random latents
with both model paths on vs both off.

    python benchmarks/cpu_training.py [--threads 2] [--repeats 5] [--cache runs/toy/cache-64]

Without --cache (or if the folder is missing) a small cache is written to a temporary folder.
Prints a table and saves benchmarks/results/cpu_training.json.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_medians, print_table, save  # noqa: E402

import pixsigma.model.transformer as tr  # noqa: E402


@contextmanager
def baseline_model_paths():
    """The fused attention kernel everywhere and the KV conv through the conv kernel (the old code)."""
    limit, window_conv = tr.CPU_MATMUL_ATTENTION_MAX_SCORES, tr.depthwise_window_conv

    def conv_kernel(grid, weight, bias):
        out = F.conv2d(grid, weight, bias, stride=weight.shape[-1], groups=grid.shape[1])  # (B, C, H/R, W/R)
        return out.permute(0, 2, 3, 1).reshape(grid.shape[0], -1, grid.shape[1])

    tr.CPU_MATMUL_ATTENTION_MAX_SCORES, tr.depthwise_window_conv = 0, conv_kernel
    try:
        yield
    finally:
        tr.CPU_MATMUL_ATTENTION_MAX_SCORES, tr.depthwise_window_conv = limit, window_conv


def fwd_bwd(fn, *shapes, dtype=torch.bfloat16):
    inputs = [torch.randn(*s, dtype=dtype, requires_grad=True) for s in shapes]

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fn(*inputs).float().sum().backward()
    return run


def attention_rows(repeats):
    rows = []
    b, heads, d = 24, 4, 64
    caption_mask = torch.ones(b, 1, 1, 80, dtype=torch.bool)
    caption_mask[..., 30:] = False
    for name, nk, mask in (("self, 256 keys", 256, None), ("self, 64 compressed keys", 64, None),
                           ("cross, 80 caption keys + mask", 80, caption_mask)):
        step = fwd_bwd(lambda q, k, v: tr.attention(q, k, v, mask), (b, heads, 256, d), (b, heads, nk, d), (b, heads, nk, d))

        def old():
            with baseline_model_paths():
                step()
        t = interleaved_medians({"old": old, "new": step}, repeats=repeats)
        rows.append({"part": "attention", "case": name, "baseline": "fused sdpa", "old_ms": 1e3 * t["old"],
                     "new_ms": 1e3 * t["new"], "speedup": t["old"] / t["new"]})
    return rows


def kv_conv_row(repeats):
    attn = tr.SelfAttention(256, 4, kv_operator="conv", kv_ratio=2)
    step = fwd_bwd(lambda x: attn.compress(x, (16, 16)), (48, 256, 256))

    def old():
        with baseline_model_paths():
            step()
    t = interleaved_medians({"old": old, "new": step}, repeats=repeats)
    return {"part": "kv-conv", "case": "48 × 16×16 tokens, C 256, R 2", "baseline": "nn.Conv2d", "old_ms": 1e3 * t["old"],
            "new_ms": 1e3 * t["new"], "speedup": t["old"] / t["new"]}


def train_step_row(repeats):
    from pixsigma.diffusion.gaussian import GaussianDiffusion
    from pixsigma.model.checkpoint import load_transformer
    from pixsigma.pipeline import default_model_dir

    torch.manual_seed(0)
    model = load_transformer(default_model_dir() / "transformer" / "model.safetensors", dtype=torch.float32).train()
    mc = model.config
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    diffusion = GaussianDiffusion(learn_sigma=mc.learn_sigma, prediction_type=mc.prediction_type)
    b, n = 24, mc.sample_size
    x0, caption = torch.randn(b, mc.in_channels, n, n), torch.randn(b, 80, mc.caption_channels)
    mask = torch.ones(b, 80, dtype=torch.long)
    mask[:, 30:] = 0

    def step():
        t, noise = torch.randint(0, 1000, (b,)), torch.randn_like(x0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = diffusion.training_loss(model, x0, t, noise, {"caption": caption, "caption_mask": mask}).loss.mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def old():
        with baseline_model_paths():
            step()
    t = interleaved_medians({"old": old, "new": step}, repeats=repeats)
    return {"part": "train step", "case": f"shipped model, batch {b}, {n}×{n} latents, bf16", "baseline": "both of the above off",
            "old_ms": 1e3 * t["old"], "new_ms": 1e3 * t["new"], "speedup": t["old"] / t["new"]}


class WholeShardCache:
    """The old reader: whole shards loaded into a 4-shard LRU."""

    def __init__(self, cache):
        self.cache, self.open = cache, OrderedDict()

    def get(self, i):
        from safetensors.torch import load_file

        from pixsigma.data.cache import shard_name

        k = i // self.cache.meta["shard_size"]
        if k not in self.open:
            self.open[k] = load_file(str(self.cache.dir / shard_name(k)))
            while len(self.open) > 4:
                self.open.popitem(last=False)
        self.open.move_to_end(k)
        return {key.split(".", 1)[1]: v for key, v in self.open[k].items() if key.split(".", 1)[0] == str(i)}


def small_cache(folder: Path, samples: int = 2000) -> Path:
    """A cache shaped like the toy one (16×16×4 latents, 20- and 80-token 384-channel captions), random numbers."""
    from pixsigma.data.cache import write_cache

    g = torch.Generator().manual_seed(0)
    rows = [{"mean": torch.randn(4, 16, 16, generator=g), "std": torch.rand(4, 16, 16, generator=g),
             "short": torch.randn(20, 384, generator=g), "long": torch.randn(80, 384, generator=g)} for _ in range(samples)]
    return write_cache(folder, rows, 64, {"factor": 4, "scaling_factor": 1.0, "shift_factor": 0.0, "latent_channels": 4},
                       max_length=80, shard_size=250, dtype="float16")


def cache_row(cache_dir, repeats):
    from pixsigma.data.cache import FeatureCache

    new = FeatureCache(cache_dir)
    old = WholeShardCache(FeatureCache(cache_dir))
    rng = random.Random(0)

    def batch(reader):
        return lambda: [reader.get(i) for i in rng.sample(new.index, 24)]
    t = interleaved_medians({"old": batch(old), "new": batch(new)}, repeats=repeats * 4)
    return {"part": "cache", "case": f"batch of 24 from {len(new.index)} samples", "baseline": "whole shards, LRU 4",
            "old_ms": 1e3 * t["old"], "new_ms": 1e3 * t["new"], "speedup": t["old"] / t["new"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cache", default=None, help="a feature cache folder (default: a small random one written to a temp folder)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = attention_rows(args.repeats) + [kv_conv_row(args.repeats), train_step_row(args.repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache if args.cache and Path(args.cache).is_dir() else small_cache(Path(tmp) / "cache")
        rows.append(cache_row(cache_dir, args.repeats))
    print_table(rows, ["part", "case", "baseline", "old_ms", "new_ms", "speedup"])
    save("cpu_training", {"config": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
