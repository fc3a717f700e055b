"""Memory per rank of XL/2 training on 2 CPU ranks (gloo): DDP against FSDP2, beside the `--plan` estimate.

fp32 master weights, CAME, 256px (32×32 latents → 256 tokens), batch 1 per rank, a few optimizer
steps. Each rank is a process started by torch.distributed.run; it reports

- `peak`: its peak RSS over the whole process (resource.getrusage ru_maxrss), which includes
  building the full model before FSDP shards it (as `pixsigma train` does);
- `train peak`: its peak RSS during the optimizer steps only (the kernel's high-water mark,
  reset through /proc/self/clear_refs after setup), i.e. the steady state of training;
- `base`: its RSS after importing torch and pixsigma, before the model is built.

The estimate is `pixsigma.train.distributed.memory_plan` (what `pixsigma train CONFIG --plan`
prints), which leaves out the process's own footprint (`base`).

The full XL/2 (28 blocks) under DDP needs several GB per rank, so by default smaller depths are
measured and the depth-28 numbers extrapolated linearly per block from the two largest depths
(marked `extrap` in the table); `--depths 28` measures the full model where memory allows.

RSS counts what the allocator holds, not only live tensors: glibc raises its mmap threshold
after large frees, so freed gathered weights and temporaries can stay in the heap.
`--mmap-threshold 65536` fixes the threshold in the ranks (MALLOC_MMAP_THRESHOLD_), which brings
RSS close to the live bytes; its results go to fsdp_memory_mmap.json.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/fsdp_memory.py [--depths 7,14] [--steps 3]

Prints a table and saves benchmarks/results/fsdp_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

GIB = 2**30
RESOLUTION, BATCH, WORLD = 256, 1, 2


def _rss(field: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(strategy: str, depth: int, steps: int, out: Path) -> None:
    """One rank: build XL/2 at `depth`, wrap it (DDP or FSDP2), train `steps` CAME steps, write its memory."""
    import torch
    import torch.distributed as dist
    from came_pytorch import CAME

    from pixsigma.model.transformer import PixArtSigmaTransformer, xl2_at
    from pixsigma.train.distributed import init_factored_state, local_parameter_bytes, shard_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    base = _rss("VmRSS")
    torch.manual_seed(0)
    config = xl2_at(RESOLUTION, depth=depth)
    model = PixArtSigmaTransformer(config).train()
    if strategy == "fsdp":
        model = shard_model(model, torch.device("cpu"))
        optimizer = CAME(model.parameters(), lr=1e-5)
        init_factored_state(optimizer)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = CAME(model.parameters(), lr=1e-5)
    held = local_parameter_bytes(model)
    side = RESOLUTION // 8
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(BATCH, config.in_channels, side, side, generator=g)
    cap = torch.randn(BATCH, config.max_caption_tokens, config.caption_channels, generator=g)
    setup = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on is training's
    for _ in range(steps):
        out_ = model(x, torch.full((BATCH,), 500), cap, force_drop_ids=torch.zeros(BATCH, dtype=torch.bool))
        out_.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    result = {"rank": rank, "base": base, "setup": setup, "train_peak": _rss("VmHWM"),
              "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "param_bytes": held}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(strategy: str, depth: int, steps: int, mmap_threshold: int | None = None) -> list[dict]:
    """Run the 2 ranks with torch.distributed.run; each rank's measurements."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
               "--master_port", str(_free_port()), __file__, "--worker", strategy, str(depth), str(steps), tmp]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        if mmap_threshold is not None:  # a fixed threshold turns off glibc's growing one: big frees go back to the OS
            env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{strategy} depth {depth} failed:\n{res.stderr[-3000:]}")
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(WORLD)]


def plan(strategy: str, depth: int) -> dict:
    from pixsigma.model.transformer import xl2_at
    from pixsigma.train.distributed import memory_plan

    return memory_plan(xl2_at(RESOLUTION, depth=depth), RESOLUTION, BATCH, WORLD, strategy, "came")


def _row(strategy: str, depth: int, how: str, m: dict, estimate: dict) -> dict:
    gib = {k: round(v / GIB, 3) for k, v in m.items()}
    return {"strategy": strategy, "depth": depth, "how": how, "base GiB": gib["base"], "peak GiB": gib["peak"],
            "train peak GiB": gib["train_peak"], "train - base GiB": round(gib["train_peak"] - gib["base"], 3),
            "plan GiB": round(estimate["total"] / GIB, 3), "params GiB/rank": gib["param_bytes"]}


def extrapolate(a: tuple[int, dict], b: tuple[int, dict], depth: int) -> dict:
    """Linear in depth through two measured (depth, numbers) points."""
    (da, ma), (db, mb) = a, b
    return {k: mb[k] + (mb[k] - ma[k]) * (depth - db) / (db - da) for k in mb if k != "rank"}


def main() -> None:
    from common import print_table, save

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="7,14", help="depths to measure (comma-separated); 28 is the full XL/2")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--strategies", default="ddp,fsdp", help="ddp, fsdp or both (comma-separated)")
    ap.add_argument("--mmap-threshold", type=int, default=None,
                    help="set MALLOC_MMAP_THRESHOLD_ (bytes) in the ranks, so that RSS follows the live tensors")
    args = ap.parse_args()
    depths = sorted(int(d) for d in args.depths.split(","))
    rows, raw = [], {}
    for strategy in args.strategies.split(","):
        measured = {}
        for depth in depths:
            ranks = launch(strategy, depth, args.steps, args.mmap_threshold)
            raw[f"{strategy}-{depth}"] = ranks
            measured[depth] = {k: max(r[k] for r in ranks) for k in ranks[0] if k != "rank"}  # the larger rank
            rows.append(_row(strategy, depth, "measured", measured[depth], plan(strategy, depth)))
            print(f"{strategy} depth {depth}: {rows[-1]}", flush=True)
        if 28 not in measured and len(depths) >= 2:
            full = extrapolate((depths[-2], measured[depths[-2]]), (depths[-1], measured[depths[-1]]), 28)
            rows.append(_row(strategy, 28, f"extrap {depths[-2]},{depths[-1]}", full, plan(strategy, 28)))
    columns = ["strategy", "depth", "how", "params GiB/rank", "base GiB", "peak GiB", "train peak GiB",
               "train - base GiB", "plan GiB"]
    print_table(rows, columns)
    name = "fsdp_memory" + ("" if args.mmap_threshold is None else "_mmap") + ("" if 28 not in depths else "_full")
    save(name, {"malloc_mmap_threshold": args.mmap_threshold, "resolution": RESOLUTION, "batch_per_rank": BATCH,
                "world": WORLD, "optimizer": "came", "precision": "fp32", "steps": args.steps, "rows": rows, "ranks": raw,
                "note": "peak: ru_maxrss of each rank (larger rank shown); train peak: VmHWM reset after "
                        "setup; plan: memory_plan estimate, which excludes the process base"})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
    else:
        main()
