"""The shipped default model: it loads, generates from the CLI, keeps its quality, fails clearly."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pixsigma.errors import PixsigmaError
from pixsigma.pipeline import SigmaPipeline, default_model_dir

SHIPPED = default_model_dir()
pytestmark = pytest.mark.skipif(not (SHIPPED / "transformer").is_dir(), reason="no shipped default model in this checkout")

# Regression floors for the quick prompt set (24 prompts × 2 seeds, 20 DPM-Solver++ steps, cfg 4.5,
# fp32): the shipped model (stage 4) measured overall 22.9% (mean over the six categories),
# single-object color 100% and position 100% (8 of 8), shape 50%; stage 3c before it read 18.8%,
# 87.5% (7 of 8) and 62.5% (5 of 8); stage 3b before that
# read 16.7%, 100% and 75% here, and the stage-3 model 22.9%, 100% and 62.5% (on the full
# held-out set overall 21.5%, 21.7%, 18.0% and 17.5%), so the quick set is noisy and the overall floor
# leaves a margin of about three images; the ε model before them placed objects by the noise
# (held-out single-object position 23.5%).
# The floors sit under the measurement and above
# chance (1 in 8 colors, 1 in 9 cells), so a broken sampler, prediction type, loader or text path
# shows up as a drop.
# Measured on the shipped model at 10 steps, fp32 (the generation is deterministic); each floor
# sits two images below the measurement, room for float differences between machines.
# quick set, seeds 0 and 1: overall 10/48
QUICK_OVERALL_FLOOR = 8 / 48
# the 49 held-out single-object prompts, seed 0: color 46, shape 18, position 40, all three 15
SINGLE_FLOORS = {"color": 44 / 49, "shape": 16 / 49, "position": 38 / 49, "all": 13 / 49}


def test_package_assets_hold_only_what_loads():
    """The default-model folder holds the index, the card, the weights and the VAE; no logs,
    scripts or JSON-lines files anywhere under the package's assets."""
    assert sorted(p.name for p in SHIPPED.iterdir()) == ["MODEL_CARD.md", "model_index.json", "transformer", "transformer_lcm", "vae"]
    assets = SHIPPED.parent
    stray = [p for p in assets.rglob("*") if p.suffix in (".py", ".jsonl", ".log") or p.name == "logs"]
    assert not stray, stray


def test_model_card_table_matches_the_reports():
    """The card's held-out rows are the numbers in the evaluation reports of the shipped model."""
    logs = SHIPPED.parents[2] / "experiments" / "default_model_logs"
    if not logs.is_dir():
        pytest.skip("no experiments/ folder beside the package (installed from a wheel)")
    card = (SHIPPED / "MODEL_CARD.md").read_text(encoding="utf-8")
    for steps in (20, 10):
        report = json.loads((logs / f"adherence_{steps}.json").read_text())
        single, cats = report["single_attributes"], report["categories"]
        values = [single["color"], single["shape"], single["position"], single["all"], cats["color_attr"]["accuracy"],
                  cats["counting"]["accuracy"], cats["two_objects"]["accuracy"], cats["position"]["accuracy"],
                  cats["colors"]["accuracy"], report["overall"]]
        row = "| " + " | ".join([str(steps)] + [f"{100 * v:.1f}%" for v in values]) + " |"
        assert row in card, row


def test_shipped_model_generates_from_cli_in_fresh_process(tmp_path):
    out = tmp_path / "img.png"
    run = subprocess.run([sys.executable, "-m", "pixsigma.cli", "generate", "a red circle at the top left", "-o", str(out),
                          "--seed", "3", "--steps", "8"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    image = Image.open(out)
    assert image.size == (64, 64)
    meta = json.loads(image.text["pixsigma"])
    assert meta["prompt"] == "a red circle at the top left" and meta["seed"] == 3


def test_evaluator_reads_shipped_vae_round_trips():
    """The evaluator on the generator's renders after the shipped VAE's round trip.

    Measured with the shipped VAE (2,500 steps + 1,500 decoder-only steps with objects weighted
    4×): 92.9% overall on these 120 images (93.5% and 92.6% on 600 each with seeds 5 and 11;
    88.7% / 87.1% before the decoder fine-tune); every category ≥ 75%. What still fails is small
    crosses decoded as diamonds, which the frozen encoder does not separate. The aim is ≥ 99%
    everywhere, which needs the encoder retrained (and the transformer after it); these floors
    guard what it has."""
    from pixsigma.toy import clean_render_accuracy
    from pixsigma.vae import VAE

    vae = VAE(SHIPPED / "vae")

    def round_trip(images):
        x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2) / 255.0
        with torch.no_grad():
            y = vae.decode(vae.encode(x))
        return [Image.fromarray((y[i].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)) for i in range(len(images))]

    report = clean_render_accuracy(n=120, seed=5, size=64, batch_transform=round_trip)
    assert report["overall"] >= 0.90, report
    for category, entry in report["categories"].items():
        assert entry["accuracy"] >= 0.7, (category, entry)
    assert report["single_attributes"]["color"] >= 0.95 and report["single_attributes"]["position"] >= 0.95


@pytest.mark.slow
def test_adherence_stays_at_its_measured_level():
    """The quick set for the overall score, and every held-out single-object prompt (49 images,
    not 8) for color, shape, position and all three."""
    from pixsigma.eval.adherence import evaluate_model
    from pixsigma.toy.prompts import heldout_prompts

    pipe = SigmaPipeline.from_pretrained()
    quick = evaluate_model(pipe, "quick", seeds=(0, 1), steps=10, batch_size=24)
    assert quick["not_scorable"] == 0
    assert quick["overall"] >= QUICK_OVERALL_FLOOR - 1e-9, quick
    singles = [p for p in heldout_prompts() if p.category == "single"]
    report = evaluate_model(pipe, "heldout", seeds=(0,), steps=10, batch_size=25, items=singles)
    single = report["single_attributes"]
    assert single["n"] == 49 and report["not_scorable"] == 0
    for attribute, floor in SINGLE_FLOORS.items():
        assert single[attribute] >= floor - 1e-9, (attribute, single)


def test_out_of_vocabulary_prompt_generates_and_is_not_scorable():
    from pixsigma.toy.evaluate import evaluate

    pipe = SigmaPipeline.from_pretrained()
    image = pipe("a photo of a cat sitting on a sofa", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
    report = evaluate([(image, "a photo of a cat sitting on a sofa")])
    assert report["not_scorable"] == 1


def test_missing_or_corrupted_shipped_weights_name_the_file_and_the_fix(tmp_path, monkeypatch):
    import pixsigma.pipeline as pipeline

    broken = tmp_path / "default_model"
    shutil.copytree(SHIPPED, broken)
    weights = broken / "transformer" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    monkeypatch.setattr(pipeline, "DEFAULT_MODEL_DIR", broken)
    with pytest.raises(PixsigmaError, match=r"model\.safetensors.*(reinstall|restore)"):
        SigmaPipeline.from_pretrained()
    shutil.rmtree(broken / "vae")
    with pytest.raises(PixsigmaError, match=r"vae.*(reinstall|restore)"):
        SigmaPipeline.from_pretrained()
