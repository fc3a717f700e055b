"""LoRA fine-tuning against full fine-tuning of the shipped toy model: trainable parameters,
optimizer state, exported file size, time per training step and peak memory.

Each run is its own process (so its peak RSS is its own): it loads the shipped transformer,
attaches a rank-R adapter on the attention projections (or trains every weight), and times
training steps of the loop's own pieces (`batch_loss`, backward, clipping, AdamW step) on a batch
of random 64px latents (16x16) and 32-token captions, bf16 autocast as the toy recipe trains. Runs
alternate full / LoRA --repeats times; the table gives each mode's median and spread, and the
ratio LoRA / full of the medians.

    python benchmarks/lora_training.py [--rank 8] [--batch 8] [--steps 8] [--repeats 3] [--threads 1]

Writes a table to stdout and JSON to benchmarks/results/lora_training.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import run_isolated  # noqa: E402

from pixsigma.io import write_json  # noqa: E402


def run_one(spec: dict) -> dict:
    import torch

    from pixsigma.diffusion.gaussian import GaussianDiffusion
    from pixsigma.model.checkpoint import load_transformer, save_safetensors
    from pixsigma.model.lora import LoraSpec, adapter_parameters, add_lora, save_lora
    from pixsigma.pipeline import DEFAULT_MODEL_DIR
    from pixsigma.train.config import config_from_dict
    from pixsigma.train.loop import batch_loss, make_optimizer

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = load_transformer(DEFAULT_MODEL_DIR / "transformer" / "model.safetensors", dtype=torch.float32).train()
    if spec["rank"]:
        model.requires_grad_(False)
        add_lora(model, LoraSpec(rank=spec["rank"], alpha=spec["rank"], targets="attention"))
        params = [p for _, p in adapter_parameters(model)]
    else:
        params = list(model.parameters())
    cfg = config_from_dict({"data": {"cache_dir": "unused"}, "optim": {"name": "adamw", "lr": 1e-4}})
    opt = make_optimizer(cfg, params)
    b, c, s = spec["batch"], model.config.caption_channels, model.config.sample_size
    g = torch.Generator().manual_seed(0)
    batch = {"mean": torch.randn(b, 4, s, s, generator=g), "std": torch.full((b, 4, s, s), 0.01),
             "caption": torch.randn(b, 32, c, generator=g), "mask": torch.ones(b, 32, dtype=torch.long)}
    vae = {"scaling_factor": 1.0, "shift_factor": 0.0}

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = batch_loss(model, GaussianDiffusion(), batch, vae, g, 0, 1, 0.1, torch.device("cpu"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(), step()  # warm-up: the optimizer's states exist from here on
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    dt = (time.perf_counter() - t0) / spec["steps"]
    with tempfile.TemporaryDirectory() as tmp:
        out = save_lora(model, Path(tmp) / "lora.safetensors") if spec["rank"] else save_safetensors(model, Path(tmp) / "model.safetensors")
        file_bytes = Path(out).stat().st_size
    return {"s_per_step": dt, "trainable": sum(p.numel() for p in params),
            "optimizer_state_bytes": sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)),
            "file_bytes": file_bytes, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lora_training.json"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    runs = {"full": [], f"lora r{args.rank}": []}
    for _ in range(args.repeats):
        for mode, rank in (("full", 0), (f"lora r{args.rank}", args.rank)):
            spec = {"rank": rank, "batch": args.batch, "steps": args.steps, "threads": args.threads}
            runs[mode].append(run_isolated(__file__, spec))
    rows = []
    for mode, rs in runs.items():
        t = [r["s_per_step"] for r in rs]
        rss = [r["peak_rss_bytes"] / 2**20 for r in rs]
        rows.append({"mode": mode, "trainable": rs[0]["trainable"], "optimizer_MiB": rs[0]["optimizer_state_bytes"] / 2**20,
                     "file_MiB": rs[0]["file_bytes"] / 2**20, "s_per_step": statistics.median(t), "s_min": min(t), "s_max": max(t),
                     "peak_rss_MiB": statistics.median(rss)})
    full, lora = rows
    ratio = {k: lora[k] / full[k] for k in ("trainable", "optimizer_MiB", "file_MiB", "s_per_step", "peak_rss_MiB")}
    print(f"shipped toy model, 64px, batch {args.batch}, bf16 autocast, AdamW, {args.threads} thread(s), "
          f"{args.repeats} alternating runs of {args.steps} steps")
    print(f"{'mode':10s} {'trainable':>10s} {'optim MiB':>9s} {'file MiB':>8s} {'s/step':>7s} {'(min-max)':>13s} {'peak RSS MiB':>12s}")
    for r in rows:
        print(f"{r['mode']:10s} {r['trainable']:10,d} {r['optimizer_MiB']:9.2f} {r['file_MiB']:8.2f} {r['s_per_step']:7.3f} "
              f"{r['s_min']:6.3f}-{r['s_max']:.3f} {r['peak_rss_MiB']:12.0f}")
    print("LoRA / full: " + ", ".join(f"{k} {v:.3f}" for k, v in ratio.items()))
    out = write_json(args.out, {"config": {k: v for k, v in vars(args).items() if k != "one"}, "rows": rows,
                                "ratio": ratio, "runs": runs}, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
