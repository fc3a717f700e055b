"""Adherence against time: DPM-Solver++ at several step counts beside the same sampler with an
ILF feedback module, on the shipped toy model.

Seconds per image: the whole pipeline call (text encoder, sampling, VAE decode) for a batch of
--time-batch prompts, every configuration timed in turn (interleaved) so machine noise hits all
alike; median, min and max of --repeats rounds after a warm-up. Adherence: the held-out
single-object prompts (color / position / all three, as `pixsigma eval adherence` scores them)
with --seeds seeds each. Writes benchmarks/results/ilf_curve.json and a plot (PIL-drawn PNG).

    python benchmarks/ilf_curve.py --feedback runs/ilf/distill/feedback.safetensors \
        [--dpm-steps 5 8 10 20] [--ilf-steps 8 10] [--seeds 1] [--repeats 3] [--plot docs/ilf_curve.png]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_times, print_table, save  # noqa: E402

from pixsigma.eval.adherence import evaluate_model  # noqa: E402
from pixsigma.pipeline import SigmaPipeline  # noqa: E402
from pixsigma.toy.prompts import heldout_prompts  # noqa: E402


def plot(rows: list[dict], path: Path) -> None:
    """All-three / color / position accuracy against seconds per image, one marker style per method."""
    from PIL import Image, ImageDraw

    w, h, m = 720, 440, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xmax = max(r["s_per_image"] for r in rows) * 1.1
    x = lambda s: m + (w - 2 * m) * s / xmax  # noqa: E731
    y = lambda a: h - m - (h - 2 * m) * a  # noqa: E731
    d.line([(m, h - m), (w - m, h - m)], fill="black")
    d.line([(m, m), (m, h - m)], fill="black")
    for a in (0, 0.25, 0.5, 0.75, 1.0):
        d.text((8, y(a) - 6), f"{a:.0%}", fill="black")
        d.line([(m, y(a)), (w - m, y(a))], fill=(225, 225, 225))
    for k in range(5):
        s = xmax * k / 4
        d.text((x(s) - 10, h - m + 6), f"{s:.2f}s", fill="black")
    d.text((w // 2 - 60, h - 24), "seconds per image", fill="black")
    metrics = {"all": (200, 0, 0), "color": (0, 120, 0), "position": (0, 0, 200)}
    for method, dash in (("dpm-solver++", False), ("ilf", True)):
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["s_per_image"])
        for metric, color in metrics.items():
            xy = [(x(r["s_per_image"]), y(r[metric])) for r in pts]
            if len(xy) > 1:
                d.line(xy, fill=color, width=1 if dash else 2)
            for px, py in xy:
                box = [px - 4, py - 4, px + 4, py + 4]
                (d.rectangle if dash else d.ellipse)(box, outline=color, fill=None if dash else color)
            for r, (px, py) in zip(pts, xy):
                d.text((px + 5, py - 12), str(r["steps"]), fill=color)
    legend = "red: all three, green: color, blue: position; filled dots: DPM-Solver++, squares: ILF; labels: steps"
    d.text((m, 12), legend, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    print(f"saved {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--feedback", required=True)
    parser.add_argument("--dpm-steps", type=int, nargs="+", default=[5, 8, 10, 20])
    parser.add_argument("--ilf-steps", type=int, nargs="+", default=[8, 10])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=None, help="use the first N single-object prompts (default all)")
    parser.add_argument("--time-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot", default="docs/ilf_curve.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = SigmaPipeline.from_pretrained(None)
    ilf = SigmaPipeline.from_pretrained(None, feedback=args.feedback)
    items = [i for i in heldout_prompts() if i.category == "single"][:args.prompts]
    configs = [("dpm-solver++", base, s) for s in args.dpm_steps] + [("ilf", ilf, s) for s in args.ilf_steps]
    prompts = [i.prompt for i in items[:args.time_batch]]
    fns = {(m, s): (lambda p=p, s=s: p(prompts, num_inference_steps=s, seed=0, output_type="np")) for m, p, s in configs}
    times = interleaved_times(fns, repeats=args.repeats, warmup=1)
    rows = []
    for method, pipe, steps in configs:
        t = [v / len(prompts) for v in times[(method, steps)]]
        report = evaluate_model(pipe, "heldout", list(range(args.seeds)), steps=steps, items=items)
        sa = report["single_attributes"]
        rows.append({"method": method, "steps": steps, "s_per_image": statistics.median(t), "s_min": min(t), "s_max": max(t),
                     "color": sa["color"], "position": sa["position"], "all": sa["all"], "n": sa["n"]})
    ref = next(r for r in rows if r["method"] == "dpm-solver++" and r["steps"] == 20) if 20 in args.dpm_steps else None
    for r in rows:
        r["speedup_vs_dpm20"] = ref["s_per_image"] / r["s_per_image"] if ref else None
    print_table(rows, ["method", "steps", "s_per_image", "s_min", "s_max", "speedup_vs_dpm20", "color", "position", "all", "n"])
    save("ilf_curve", {"feedback": args.feedback, "seeds": args.seeds, "time_batch": args.time_batch, "rows": rows})
    plot(rows, Path(args.plot))


if __name__ == "__main__":
    main()
