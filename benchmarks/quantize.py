"""Quantized inference against bf16: output error, weight memory, peak RSS, time per step, and a
T5-XXL-shaped text encoder.

Sections (each saved under its name in benchmarks/results/quantize.json):
- error_toy: relative L2 of the shipped toy transformer's output against its bf16 output, per
  mode, on held-out-style prompts at timesteps 900/500/100 (svdquant calibrated on the default
  calibration prompts, as the pipeline does).
- error_xl: the same on single XL-shaped linears (random xavier weights; inputs with a few outlier
  channels, as DiT activations have).
- speed_toy / speed_xl: weight bytes, peak RSS (a fresh process per mode; build_peak: while
  building and quantizing, peak: during the steps alone) and time per transformer step (batch 2,
  a CFG pair), median of --repeats with min/max. XL has random weights (the timing
  and memory do not depend on their values; svdquant's buffers are filled at random, not fitted).
- t5: a T5 encoder with T5-XXL's layer shapes and --t5-layers layers (random weights, written to a
  temporary folder and loaded back), bytes per layer and encode time (300 tokens) in bf16 / int8 /
  int4, extrapolated to T5-XXL's 24 layers.
- adherence: `evaluate_model` on the toy model for bf16 and each mode.

svdquant is W4A4 SIMULATED (no W4A4 CPU kernel): its times measure the dequantizing emulation,
not what a W4A4 kernel would do. The machine may be shared: compare ratios within one run.

    python benchmarks/quantize.py --sections error_toy error_xl speed_toy t5
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, interleaved_times, machine, print_table  # noqa: E402

from pixsigma.model.quantize import (  # noqa: E402
    NAIVE_W4A4, SVDQuantConfig, SVDQuantLinear, collect_activation_amax, quantize_linears, quantize_text_encoder,
    quantize_transformer, target_linears, transformer_bytes,
)

VARIANTS = {  # name -> (mode, svdquant config)
    "int8": ("int8", None), "int4": ("int4", None), "w4a4_naive": ("svdquant", NAIVE_W4A4),
    "smooth_only": ("svdquant", SVDQuantConfig(rank=0)), "svdquant_r16": ("svdquant", SVDQuantConfig(rank=16)), "svdquant_r32": ("svdquant", SVDQuantConfig(rank=32)),
    "svdquant_r64": ("svdquant", SVDQuantConfig(rank=64)),
}
EVAL_PROMPTS = ["a photo of a red circle at the top left", "a photo of a blue square below a green triangle",
                "a photo of two yellow crosses", "a photo of a purple triangle at the bottom right"]


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def timed(fn, repeats: int) -> dict:
    times = interleaved_times({"run": fn}, repeats=repeats)["run"]  # one warm-up call, then `repeats`
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def quantized_copy(model, name, amax):
    mode, svd = VARIANTS[name]
    m = copy.deepcopy(model)
    return quantize_transformer(m, mode, svdquant=svd or SVDQuantConfig(), act_amax=amax if svd and svd.alpha else None)


# -- toy ------------------------------------------------------------------------------------------


def toy_pipeline():
    from pixsigma.pipeline import SigmaPipeline

    return SigmaPipeline.from_pretrained(dtype="bf16", text_dtype="fp32", vae_dtype="fp32")


def toy_inputs(pipe):
    emb, mask = pipe.text_encoder.encode(EVAL_PROMPTS)
    g = torch.Generator().manual_seed(0)
    s = pipe.transformer.config.sample_size
    x = torch.randn(len(EVAL_PROMPTS), pipe.transformer.config.in_channels, s, s, generator=g)
    return [(x, torch.full((len(EVAL_PROMPTS),), t), emb.bfloat16(), mask) for t in (900, 500, 100)]


def calibration_amax(pipe):
    from pixsigma.model.quantize import CALIBRATION_PROMPTS, CALIBRATION_STEPS

    run = lambda: pipe(list(CALIBRATION_PROMPTS), num_inference_steps=CALIBRATION_STEPS, output_type="latent", seed=0)  # noqa: E731
    return collect_activation_amax(pipe.transformer, list(target_linears(pipe.transformer)), run)


def error_toy(args) -> list[dict]:
    pipe = toy_pipeline()
    base = pipe.transformer
    inputs = toy_inputs(pipe)
    amax = calibration_amax(pipe)
    with torch.no_grad():
        refs = [base(*i).float() for i in inputs]
    rows = []
    for name in VARIANTS:
        m = quantized_copy(base, name, amax)
        with torch.no_grad():
            errs = [rel(m(*i), r) for i, r in zip(inputs, refs)]
        rows.append({"variant": name, "rel_l2": statistics.mean(errs), "t900": errs[0], "t500": errs[1], "t100": errs[2],
                     "weight_MB": transformer_bytes(m) / 2**20, "vs_bf16_bytes": transformer_bytes(m) / transformer_bytes(base)})
    rows.insert(0, {"variant": "bf16", "rel_l2": 0.0, "weight_MB": transformer_bytes(base) / 2**20, "vs_bf16_bytes": 1.0})
    print_table(rows, ["variant", "rel_l2", "t900", "t500", "t100", "weight_MB", "vs_bf16_bytes"])
    return rows


# -- XL-shaped layers -----------------------------------------------------------------------------


XL_LAYERS = {"attn.qkv": (1152, 3456), "attn.proj": (1152, 1152), "mlp.fc1": (1152, 4608), "mlp.fc2": (4608, 1152)}


def xl_input(in_features: int, tokens: int, g) -> torch.Tensor:
    x = torch.randn(tokens, in_features, generator=g)
    outliers = torch.randperm(in_features, generator=g)[: max(1, in_features // 100)]
    x[:, outliers] *= 20.0  # a few channels ~20x larger, the activation outliers smoothing targets
    return x


def error_xl(args) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for layer, (fin, fout) in XL_LAYERS.items():
        lin = torch.nn.Linear(fin, fout)
        torch.nn.init.xavier_uniform_(lin.weight, generator=g)
        x = xl_input(fin, 512, g)
        with torch.no_grad():
            ref = lin.to(torch.bfloat16)(x.bfloat16()).float()
            lin.float()
            amax = x.abs().amax(dim=0)
            row = {"layer": layer, "shape": f"{fin}->{fout}"}
            for name, (mode, svd) in VARIANTS.items():
                if mode == "svdquant":
                    q = SVDQuantLinear.from_linear(lin, svd, amax if svd.alpha else None)
                else:
                    q = torch.nn.Sequential(copy.deepcopy(lin))
                    quantize_linears(q, mode)
                row[name] = rel(q(x.bfloat16()), ref)
        rows.append(row)
        print(row, flush=True)
    print_table(rows, ["layer", "shape", *VARIANTS])
    return rows


# -- speed and memory -----------------------------------------------------------------------------


def random_svdquant(model) -> None:
    """Replace the target linears by SVDQuant layers of rank 32 with random buffers (timing only)."""
    from pixsigma.model.quantize import _set_module

    for n, lin in target_linears(model).items():
        q = SVDQuantLinear(lin.in_features, lin.out_features, lin.bias is not None, 32, 64)
        q.qweight.random_(0, 256)
        q.wscale.fill_(0.01)
        q.down.normal_(0, 0.02)
        q.up.normal_(0, 0.02)
        _set_module(model, n, q)
    model.quantization = {"mode": "svdquant"}


def rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM; ru_maxrss would carry the parent's peak across exec) or
    current (VmRSS) resident memory."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def speed_child(which: str, mode: str, latent: int, repeats: int) -> dict:
    """One mode in this process: build, quantize, time; peak RSS at the end."""
    from pixsigma.model.transformer import PixArtSigmaTransformer, xl2_at

    if which == "toy":
        pipe = toy_pipeline()
        model = pipe.transformer
        amax = calibration_amax(pipe) if mode.startswith("svdquant") else None
        del pipe
    else:
        with torch.device("meta"):
            model = PixArtSigmaTransformer(xl2_at(latent * 8))
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        amax = None
    if mode == "svdquant_r32" and which == "xl":
        random_svdquant(model)
    elif mode != "bf16":
        model = quantized_copy(model, mode, amax) if which == "toy" else quantize_transformer(model, VARIANTS[mode][0])
    build_peak = rss_mb()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak: the steps' own, without the build/quantize transient
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, latent, latent)
    cap = torch.randn(2, 120 if which == "xl" else 16, cfg.caption_channels, dtype=torch.bfloat16)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        ctx = model.prepare_caption(cap)
        res = timed(lambda: model(x, t, ctx), repeats)
    res.update(weight_MB=transformer_bytes(model) / 2**20, build_peak_MB=build_peak, peak_rss_MB=rss_mb(), rss_after_MB=rss_mb("VmRSS"))
    return res


def speed(which: str, args) -> list[dict]:
    modes = ["bf16", "int8", "int4", "svdquant_r32"]
    latent = args.xl_latent if which == "xl" else 16
    rows = []
    for mode in modes:
        cmd = [sys.executable, __file__, "--child", which, mode, str(latent), str(args.repeats)]
        # glibc returns freed blocks >= 128 KiB to the OS only with a fixed mmap threshold: without
        # it the RSS after quantizing still holds the freed bf16 weights
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            print(out.stderr[-2000:])
            rows.append({"mode": mode, "error": out.stderr.strip().splitlines()[-1]})
            continue
        rows.append({"mode": mode, **json.loads(out.stdout.strip().splitlines()[-1])})
        print(rows[-1], flush=True)
    base = next(r for r in rows if r["mode"] == "bf16")
    for r in rows:
        if "median_s" in r:
            r["time_vs_bf16"] = r["median_s"] / base["median_s"]
            r["bytes_vs_bf16"] = r["weight_MB"] / base["weight_MB"]
    print_table(rows, ["mode", "weight_MB", "bytes_vs_bf16", "build_peak_MB", "peak_rss_MB", "rss_after_MB", "median_s", "min_s", "max_s", "time_vs_bf16"])
    return rows


# -- T5-XXL-shaped encoder ------------------------------------------------------------------------


def t5(args) -> list[dict]:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=args.t5_layers, num_heads=64,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        T5EncoderModel(cfg).to(torch.bfloat16).save_pretrained(tmp)  # the folder the runs load from
        ids = torch.randint(0, 32128, (1, 300))
        for mode in ("bf16", "int8", "int4"):
            enc = T5EncoderModel.from_pretrained(tmp, dtype=torch.bfloat16).eval()
            if mode != "bf16":
                quantize_text_encoder(enc, mode)
            layer = transformer_bytes(enc.encoder.block[0])
            rest = transformer_bytes(enc) - layer * args.t5_layers
            with torch.no_grad():
                res = timed(lambda: enc(input_ids=ids), args.repeats)
            rows.append({"mode": mode, "MB_per_layer": layer / 2**20, "MB_other": rest / 2**20,
                         "GB_24_layers": (rest + 24 * layer) / 2**30, "encode_s_per_layer": res["median_s"] / args.t5_layers,
                         "encode_s_24_layers": res["median_s"] / args.t5_layers * 24, **res})
            print(rows[-1], flush=True)
            del enc
    print_table(rows, ["mode", "MB_per_layer", "MB_other", "GB_24_layers", "encode_s_per_layer", "encode_s_24_layers"])
    return rows


# -- adherence ------------------------------------------------------------------------------------


def adherence(args) -> list[dict]:
    from pixsigma.eval.adherence import evaluate_model
    from pixsigma.pipeline import SigmaPipeline

    rows = []
    for mode in args.modes:
        pipe = SigmaPipeline.from_pretrained(dtype="bf16", text_dtype="fp32", vae_dtype="fp32",
                                             quantize=None if mode == "bf16" else mode)
        t0 = time.perf_counter()
        rep = evaluate_model(pipe, args.prompts, seeds=tuple(range(args.seeds)), steps=args.steps)
        row = {"mode": mode, "prompts": args.prompts, "seeds": args.seeds, "seconds": time.perf_counter() - t0,
               **{k: v for k, v in rep.items() if isinstance(v, (int, float))},
               **{f"single_{k}": v for k, v in rep["single_attributes"].items() if isinstance(v, (int, float))},
               "report": rep}
        rows.append(row)
        print({k: v for k, v in row.items() if k != "report"}, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sections", nargs="+", default=["error_toy", "error_xl", "speed_toy", "t5"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--xl-latent", type=int, default=32, help="XL latent side (32 = 256px)")
    p.add_argument("--t5-layers", type=int, default=2)
    p.add_argument("--prompts", default="quick")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--modes", nargs="+", default=["bf16", "int8", "int4", "svdquant"], help="adherence: the modes")
    p.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        which, mode, latent, repeats = args.child
        print(json.dumps(speed_child(which, mode, int(latent), int(repeats))))
        return
    funcs = {"error_toy": error_toy, "error_xl": error_xl, "speed_toy": lambda a: speed("toy", a),
             "speed_xl": lambda a: speed("xl", a), "t5": t5, "adherence": adherence}
    path = RESULTS / "quantize.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    for name in args.sections:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        key = f"adherence_{Path(args.prompts).stem}" if name == "adherence" else name
        data[key] = {"rows": funcs[name](args), "seconds": time.perf_counter() - t0, "machine": machine(),
                      "args": {k: v for k, v in vars(args).items() if k != "child"}}
        RESULTS.mkdir(exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, path)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
