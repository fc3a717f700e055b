"""Training-step benchmark: steps/s and memory for a small transformer at 256px-equivalent latents.

Configurations: optimizer CAME vs AdamW × gradient checkpointing off/on × KV compression off /
on the deep half (conv, R = 2). Each configuration runs in its own process (so peak RSS is its
own) through the training loop's pieces (`build_model`-equivalent model, `make_optimizer`,
`batch_loss`, backward, clip 0.01, optimizer step) on random latents (B, 4, 32, 32) and
captions (B, 32, C).

Reported per configuration: steps/s, activation bytes saved for backward (sum of distinct
tensors the autograd graph keeps: what gradient checkpointing cuts), optimizer state bytes, peak
process RSS (CPU) or peak CUDA memory. Writes a table to stdout and JSON to
benchmarks/results/train_step.json.

    python benchmarks/train_step.py [--steps 6] [--batch 4] [--preset small] [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import run_isolated  # noqa: E402

from pixsigma.io import write_json  # noqa: E402


def run_one(spec: dict) -> dict:
    import torch

    from pixsigma.diffusion.gaussian import GaussianDiffusion
    from pixsigma.model import PRESETS, PixArtSigmaTransformer, count_parameters
    from pixsigma.model.transformer import KVCompressConfig, deep_half
    from pixsigma.train.config import config_from_dict
    from pixsigma.train.loop import batch_loss, make_optimizer

    device = torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    base = PRESETS[spec["preset"]]
    kv = KVCompressConfig("conv", 2, deep_half(base.depth)) if spec["kv"] else KVCompressConfig()
    model = PixArtSigmaTransformer(base.with_(sample_size=32, kv_compress=kv)).to(device).train()
    model.set_runtime_options(gradient_checkpointing=spec["grad_ckpt"])
    cfg = config_from_dict({"data": {"cache_dir": "unused"}, "optim": {"name": spec["optim"], "lr": 1e-4}})
    opt = make_optimizer(cfg, model.parameters())
    diffusion = GaussianDiffusion()
    b, c = spec["batch"], base.caption_channels
    g = torch.Generator().manual_seed(0)
    batch = {"mean": torch.randn(b, 4, 32, 32, generator=g), "std": torch.full((b, 4, 32, 32), 0.01),
             "caption": torch.randn(b, 32, c, generator=g), "mask": torch.ones(b, 32, dtype=torch.long)}
    vae = {"scaling_factor": 1.0, "shift_factor": 0.0}

    saved = {}

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            saved[key] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    def step(measure=False):
        if measure:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = batch_loss(model, diffusion, batch, vae, g, 0, 1, 0.1, device)
        else:
            loss = batch_loss(model, diffusion, batch, vae, g, 0, 1, 0.1, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(measure=True)  # warm-up, and the activation measurement
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    opt_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return {
        **spec,
        "params": count_parameters(model),
        "steps_per_s": spec["steps"] / dt,
        "samples_per_s": spec["steps"] * b / dt,
        "activation_bytes": sum(saved.values()),
        "optimizer_state_bytes": opt_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--preset", default="small", choices=["tiny", "small", "xl_2"])
    p.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (1: steadier on a shared machine)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    rows = []
    for optim, grad_ckpt, kv in itertools.product(["came", "adamw"], [False, True], [False, True]):
        spec = {"optim": optim, "grad_ckpt": grad_ckpt, "kv": kv, "preset": args.preset, "batch": args.batch,
                "steps": args.steps, "device": args.device, "threads": args.threads}
        rows.append(run_isolated(__file__, spec))
        print(f"{optim:6s} ckpt={str(grad_ckpt):5s} kv={str(kv):5s} {rows[-1]['steps_per_s']:.2f} steps/s", file=sys.stderr)
    mib = 2**20
    head = f"{'optim':6s} {'grad ckpt':9s} {'KV (deep)':9s} {'steps/s':>8s} {'samples/s':>9s} {'activ MiB':>9s} {'optim MiB':>9s} {'peak MiB':>9s}"
    print(f"preset {args.preset}, latent 32x32 (256 tokens), batch {args.batch}, device {args.device}, "
          f"{rows[0]['params']:,} params (KV adds {rows[1]['params'] - rows[0]['params']:,})")
    print(head)
    for r in rows:
        peak = r["peak_cuda_bytes"] if r["peak_cuda_bytes"] is not None else r["peak_rss_bytes"]
        print(f"{r['optim']:6s} {str(r['grad_ckpt']):9s} {str(r['kv']):9s} {r['steps_per_s']:8.2f} {r['samples_per_s']:9.1f} "
              f"{r['activation_bytes'] / mib:9.1f} {r['optimizer_state_bytes'] / mib:9.2f} {peak / mib:9.0f}")
    out = write_json(args.out, {"config": {k: v for k, v in vars(args).items() if k != "one"}, "rows": rows}, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
