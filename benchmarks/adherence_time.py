"""Adherence against denoising time on the shipped toy model: DPM-Solver++ at several step counts
beside the LCM variant (no guidance), training-free step caching (FORA, Δ-DiT) and an ILF
feedback module, in one table and one plot.

Adherence (transformer in bf16; text encoder and VAE fp32): the 49 single-object held-out
prompts × --seeds seeds give color / shape / position / all three; every --every-th prompt of the
240 held-out prompts (all categories) × --seeds gives overall. Time: the pipeline's denoising
time of one-image calls (text encoding and VAE decoding excluded), every row in turn (interleaved)
so that machine noise hits all alike; median and min-max of --repeats rounds after a warm-up.

The two phases run separately, so the slow one can be split across processes and the timing
can wait for a quiet machine:

    python benchmarks/adherence_time.py adherence [--rows dpm-20 lcm-4 ...] [--feedback FILE]
    python benchmarks/adherence_time.py time [--repeats 7] [--feedback FILE]
    python benchmarks/adherence_time.py report [--plot docs/adherence_time.png]

Per-row reports and the timings go to benchmarks/results/adherence_time/; `report` writes the
table to stdout and to benchmarks/results/adherence_time.json, and the plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS, interleaved_times, machine, print_table  # noqa: E402
from pixsigma.eval.adherence import evaluate_model  # noqa: E402
from pixsigma.io import write_json  # noqa: E402
from pixsigma.pipeline import SigmaPipeline  # noqa: E402
from pixsigma.toy.prompts import heldout_prompts  # noqa: E402

OUT = RESULTS / "adherence_time"
TIME_PROMPT = "a photo of a red circle at the top left"


@dataclass(frozen=True)
class Row:
    label: str
    method: str          # dpm-solver++ | lcm | fora | delta | ilf
    pipe: str            # which pipeline: base | lcm | ilf
    steps: int
    call: dict = field(default_factory=dict)


def rows() -> list[Row]:
    dpm = {"sampler": "dpm-solver", "guidance_scale": 4.5}
    out = [Row(f"dpm-{s}", "dpm-solver++", "base", s, dpm) for s in (20, 10, 5)]
    out += [Row(f"lcm-{s}", "lcm", "lcm", s, {"sampler": "lcm", "guidance_scale": 1.0}) for s in (8, 4, 2, 1)]
    out += [Row(f"{m}-{k}", m, "base", 20, {**dpm, "step_cache": {"mode": m, "interval": k}})
            for m in ("fora", "delta") for k in (2, 3)]
    out += [Row(f"ilf-{s}", "ilf", "ilf", s, dpm) for s in (10, 8)]
    return out


def pipelines(needed: set[str], feedback: str | None) -> dict:
    kw = {"dtype": "bf16", "text_dtype": torch.float32, "vae_dtype": torch.float32}
    pipes = {}
    if "base" in needed:
        pipes["base"] = SigmaPipeline.from_pretrained(None, **kw)
    if "lcm" in needed:
        pipes["lcm"] = SigmaPipeline.from_pretrained(None, variant="lcm", **kw)
    if "ilf" in needed:
        if not feedback:
            raise SystemExit("the ilf rows need --feedback FILE (a module from `pixsigma distill ilf`)")
        pipes["ilf"] = SigmaPipeline.from_pretrained(None, feedback=feedback, **kw)
    return pipes


def selected(names: list[str] | None, feedback: str | None) -> list[Row]:
    chosen = [r for r in rows() if (names is None or r.label in names) and (feedback or r.pipe != "ilf")]
    if names and len(chosen) != len(names):
        raise SystemExit(f"unknown rows in {names}; expected some of {[r.label for r in rows()]}")
    return chosen


def measure_adherence(args) -> None:
    chosen = selected(args.rows, args.feedback)
    pipes = pipelines({r.pipe for r in chosen}, args.feedback)
    every = heldout_prompts()
    single = [i for i in every if i.category == "single"]
    for r in chosen:
        pipe, seeds, cache = pipes[r.pipe], list(range(args.seeds)), r.call.get("step_cache")
        rep_single = evaluate_model(pipe, "heldout", seeds, r.steps, r.call["guidance_scale"], r.call["sampler"],
                                    items=single, step_cache=cache)
        rep_all = evaluate_model(pipe, "heldout", seeds, r.steps, r.call["guidance_scale"], r.call["sampler"],
                                 items=every[:: args.every], step_cache=cache)
        sa = rep_single["single_attributes"]
        result = {"label": r.label, "method": r.method, "steps": r.steps, "call": r.call, "color": sa["color"],
                  "shape": sa["shape"], "position": sa["position"], "all": sa["all"], "n_single": sa["n"],
                  "overall": rep_all["overall"], "n_overall": len(every[:: args.every]) * len(seeds)}
        write_json(OUT / f"{r.label}.json", result, indent=1)
        print(json.dumps(result), flush=True)


def measure_time(args) -> None:
    chosen = selected(args.rows, args.feedback)
    pipes = pipelines({r.pipe for r in chosen}, args.feedback)
    torch.set_num_threads(args.threads)
    denoise: dict[str, list[float]] = {r.label: [] for r in chosen}

    def call(r: Row):
        out = pipes[r.pipe](TIME_PROMPT, num_inference_steps=r.steps, seed=0, output_type="latent", **r.call)
        denoise[r.label].append(out.timings["denoise"])

    interleaved_times({r.label: (lambda r=r: call(r)) for r in chosen}, repeats=args.repeats, warmup=1)
    times = {label: t[1:] for label, t in denoise.items()}  # the first call of each row is the warm-up
    write_json(OUT / "times.json", {"machine": machine(), "threads": args.threads, "repeats": args.repeats, "times": times}, indent=1)
    for label, t in times.items():
        print(f"{label:10s} {statistics.median(t):.3f} s ({min(t):.3f}-{max(t):.3f})")


def report(args) -> None:
    timing = json.loads((OUT / "times.json").read_text())
    table = []
    for r in rows():
        path = OUT / f"{r.label}.json"
        if not path.is_file() or r.label not in timing["times"]:
            continue
        t = timing["times"][r.label]
        table.append({**json.loads(path.read_text()), "s_per_image": statistics.median(t), "s_min": min(t), "s_max": max(t)})
    ref = next(r for r in table if r["label"] == "dpm-20")
    for r in table:
        r["speedup_vs_dpm20"] = ref["s_per_image"] / r["s_per_image"]
        for k in ("color", "position", "all"):
            r[f"d_{k}"] = 100 * (r[k] - ref[k])
    cols = ["label", "steps", "color", "shape", "position", "all", "overall", "s_per_image", "s_min", "s_max", "speedup_vs_dpm20"]
    print_table(table, cols)
    write_json(RESULTS / "adherence_time.json", {"machine": timing["machine"], "threads": timing["threads"], "rows": table}, indent=1)
    plot(table, Path(args.plot))


def plot(table: list[dict], path: Path) -> None:
    """All three, color and position against seconds per image; one marker per method."""
    from PIL import Image, ImageDraw

    w, h, m = 760, 460, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xmax = max(r["s_per_image"] for r in table) * 1.1
    x = lambda s: m + (w - 2 * m) * s / xmax  # noqa: E731
    y = lambda a: h - m - (h - 2 * m) * a  # noqa: E731
    d.line([(m, h - m), (w - m, h - m)], fill="black")
    d.line([(m, m), (m, h - m)], fill="black")
    for a in (0, 0.25, 0.5, 0.75, 1.0):
        d.text((8, y(a) - 6), f"{a:.0%}", fill="black")
        d.line([(m, y(a)), (w - m, y(a))], fill=(225, 225, 225))
    for k in range(5):
        d.text((x(xmax * k / 4) - 10, h - m + 6), f"{xmax * k / 4:.2f}s", fill="black")
    d.text((w // 2 - 80, h - 24), "denoising seconds per image", fill="black")
    colors = {"all": (200, 0, 0), "color": (0, 120, 0), "position": (0, 0, 200)}
    markers = {"dpm-solver++": "dot", "lcm": "square", "fora": "triangle", "delta": "diamond", "ilf": "cross"}
    for method, marker in markers.items():
        pts = sorted((r for r in table if r["method"] == method), key=lambda r: r["s_per_image"])
        for metric, color in colors.items():
            xy = [(x(r["s_per_image"]), y(r[metric])) for r in pts]
            if len(xy) > 1:
                d.line(xy, fill=color, width=2 if method == "dpm-solver++" else 1)
            for (px, py), r in zip(xy, pts):
                _marker(d, marker, px, py, color)
                if metric == "all":
                    d.text((px + 5, py - 12), r["label"], fill=color)
    d.text((m, 10), "red: all three, green: color, blue: position (single-object held-out prompts)", fill="black")
    d.text((m, 24), "dot: DPM-Solver++, square: LCM, triangle: FORA, diamond: delta-DiT, cross: ILF", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    print(f"saved {path}")


def _marker(d, kind: str, px: float, py: float, color) -> None:
    r = 4
    if kind == "dot":
        d.ellipse([px - r, py - r, px + r, py + r], fill=color)
    elif kind == "square":
        d.rectangle([px - r, py - r, px + r, py + r], outline=color)
    elif kind == "triangle":
        d.polygon([(px, py - r), (px + r, py + r), (px - r, py + r)], outline=color)
    elif kind == "diamond":
        d.polygon([(px, py - r), (px + r, py), (px, py + r), (px - r, py)], outline=color)
    else:
        d.line([(px - r, py - r), (px + r, py + r)], fill=color)
        d.line([(px - r, py + r), (px + r, py - r)], fill=color)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=["adherence", "time", "report"])
    ap.add_argument("--rows", nargs="+", default=None, help="row labels (default: all; the ilf rows need --feedback)")
    ap.add_argument("--feedback", default=None, help="an ILF feedback module for the ilf rows")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--every", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", default="docs/adherence_time.png")
    args = ap.parse_args()
    {"adherence": measure_adherence, "time": measure_time, "report": report}[args.phase](args)


if __name__ == "__main__":
    main()
