"""Benchmark of `SigmaPipeline` generation on CPU with tiny random components.

Cases (each in its own subprocess so peak RSS is per case):
  e2e-256     tiny model at 256 px, DPM-Solver++ 20 steps, CFG 4.5: time split into text
              encoding, denoising and decoding.
  gen-2048    the 4K test model (2 layers, hidden 16, KV compression in layer 1, factor-8 VAE)
              at 2048², 1 step with CFG: peak RSS (for the linear-growth comparison).
  gen-4096    the same at 4096² (65,536 tokens at patch 2): time split + peak RSS.
  vae-4096-tiled / vae-4096-untiled
              decoding one 512² latent (a 4096² image) tiled vs untiled: time + peak RSS. The
              tiny VAE has no mid-block attention here (its cost is quadratic in latent pixels:
              untiled it would take minutes on CPU).

    python benchmarks/generate.py            # all cases, table + benchmarks/results/generate.json
    python benchmarks/generate.py --case e2e-256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "generate.json"
CASES = ["e2e-256", "gen-2048", "gen-4096", "vae-4096-tiled", "vae-4096-untiled"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_case(name: str, threads: int | None = None) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    if threads:
        torch.set_num_threads(threads)
    from pixsigma.model.transformer import KVCompressConfig
    from pixsigma.pipeline import SigmaPipeline
    from pixsigma.vae import VAE
    from tests.tiny_components import build_pipeline_folder, build_transformer, build_vae

    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="pixsigma-bench-"))
    result = {"case": name, "threads": torch.get_num_threads()}
    if name == "e2e-256":
        folder = build_pipeline_folder(tmp / "p", sample_size=32, vae_levels=4, vae_channels=32, vae_groups=8,
                                       hidden=64, depth=4, max_tokens=32)
        pipe = SigmaPipeline.from_pretrained(folder)
        pipe("warm up", num_inference_steps=2, seed=0, output_type="np")
        runs = []
        for seed in range(3):
            t0 = time.perf_counter()
            out = pipe("a small cactus with a happy face in the desert", num_inference_steps=20, guidance_scale=4.5,
                       seed=seed, output_type="np")
            runs.append({**out.timings, "total": time.perf_counter() - t0})
        best = min(runs, key=lambda r: r["total"])
        result.update(size="256x256", steps=20, cfg=4.5, sampler="dpm-solver", tokens=(256 // 8 // 2) ** 2,
                      **{f"{k}_s": round(v, 4) for k, v in best.items()})
    elif name.startswith("gen-"):
        side = int(name.split("-")[1])
        folder = build_pipeline_folder(tmp / "p", sample_size=512, vae_levels=4, vae_channels=8, vae_groups=4,
                                       vae_layers_per_block=0, vae_mid_attention=False, hidden=16)
        model = build_transformer(32, 512, hidden=16, depth=2, heads=2, kv_compress=KVCompressConfig("conv", 2, (1,)))
        pipe = SigmaPipeline.from_pretrained(folder, transformer=model)
        base = _current_rss_mb()
        t0 = time.perf_counter()
        out = pipe("a cat", height=side, width=side, num_inference_steps=1, guidance_scale=4.5, seed=0, output_type="pt",
                   use_resolution_binning=False)  # generate at exactly side² (not the model's 4K bin)
        total = time.perf_counter() - t0
        assert out.images.shape[-2:] == (side, side) and out.info["generated_height"] == side
        result.update(size=f"{side}x{side}", steps=1, cfg=4.5, tokens=(side // 16) ** 2, total_s=round(total, 3),
                      **{f"{k}_s": round(v, 3) for k, v in out.timings.items()},
                      rss_before_mb=round(base, 1), peak_rss_mb=round(_rss_mb(), 1))
    elif name.startswith("vae-"):
        tiled = name.endswith("-tiled")
        vae = VAE(build_vae(4, 8, 4, layers_per_block=0, mid_attention=False))
        z = torch.randn(1, 4, 512, 512)
        vae.decode(torch.randn(1, 4, 64, 64), tiled=False)  # warm up the kernels
        base = _current_rss_mb()
        t0 = time.perf_counter()
        img = vae.decode(z, tiled=tiled)
        total = time.perf_counter() - t0
        result.update(size="4096x4096", tiled=tiled, tile_latent=vae.tile_latent, overlap_latent=vae.overlap_latent,
                      decode_s=round(total, 3), rss_before_mb=round(base, 1), peak_rss_mb=round(_rss_mb(), 1),
                      output_mb=round(img.numel() * 4 / 2**20, 1))
    else:
        raise SystemExit(f"unknown case {name!r}; expected one of {CASES}")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=CASES, help="run one case in this process and print its JSON")
    ap.add_argument("--cases", nargs="*", default=CASES, help="cases to run (each in a subprocess)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.threads)))
        return 0
    results = []
    for case in args.cases:
        t0 = time.perf_counter()
        extra = ["--threads", str(args.threads)] if args.threads else []
        proc = subprocess.run([sys.executable, __file__, "--case", case, *extra], capture_output=True, text=True,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
        if proc.returncode != 0:
            print(f"{case}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            results.append({"case": case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"})
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        results.append(r)
        print(f"{case}: done in {r['wall_s']} s", file=sys.stderr)
    cols = ["case", "size", "threads", "text_s", "denoise_s", "decode_s", "total_s", "peak_rss_mb", "rss_before_mb"]
    print(" | ".join(f"{c:>14}" for c in cols))
    for r in results:
        print(" | ".join(f"{str(r.get(c, '')):>14}" for c in cols))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_name(f".{RESULTS.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}, "results": results}, indent=2))
    os.replace(tmp, RESULTS)
    print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
