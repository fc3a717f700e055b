"""LoRA from the outside: `pixsigma generate --lora PATH[:SCALE]` (repeatable), `pixsigma lora
merge`, the pipeline's diffusers-named methods and the package API."""

import numpy as np
import pytest
import torch
from PIL import Image

import pixsigma
from pixsigma.cli import main, parse_lora_arg
from pixsigma.model import lora as L
from pixsigma.model.checkpoint import load_transformer
from pixsigma.pngmeta import read_png_params
from tests.tiny_components import build_pipeline_folder


@pytest.fixture(scope="module")
def folder_and_loras(tmp_path_factory):
    """A tiny pipeline folder and two LoRA files (random B) for its transformer."""
    root = tmp_path_factory.mktemp("lora_cli")
    folder = build_pipeline_folder(root / "p")
    paths = []
    for seed in (0, 1):
        model = load_transformer(folder / "transformer")
        L.add_lora(model, L.LoraSpec(rank=2, targets=("attention+mlp",)))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in L.adapter_parameters(model):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        paths.append(pixsigma.save_lora(model, root / f"l{seed}.safetensors"))
    return folder, paths


def generate(folder, out, *extra):
    rc = main(["generate", "a red circle", "--model", str(folder), "-o", str(out), "--seed", "3", "--steps", "2", *extra])
    assert rc == 0
    return np.asarray(Image.open(out), dtype=np.int16)


def test_parse_lora_arg():
    assert parse_lora_arg("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_lora_arg("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_lora_arg("C:/x/b.safetensors") == ("C:/x/b.safetensors", 1.0)


def test_generate_with_loras_changes_the_image_and_records_them(tmp_path, folder_and_loras):
    folder, (a, b) = folder_and_loras
    plain = generate(folder, tmp_path / "plain.png")
    one = generate(folder, tmp_path / "one.png", "--lora", f"{a}:0.8")
    two = generate(folder, tmp_path / "two.png", "--lora", f"{a}:0.8", "--lora", str(b))
    assert np.abs(one - plain).max() > 0 and np.abs(two - one).max() > 0
    assert read_png_params(tmp_path / "two.png")["lora"] == f"{a}:0.8,{b}:1"
    assert "lora" not in read_png_params(tmp_path / "plain.png")


def test_pipeline_methods_and_merge_agree(tmp_path, folder_and_loras):
    """pipe.load_lora_weights + set_adapters == fuse_lora == `pixsigma lora merge`; unload restores."""
    folder, (a, _) = folder_and_loras
    pipe = pixsigma.SigmaPipeline.from_pretrained(folder)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    kw = dict(num_inference_steps=2, seed=0, output_type="latent")
    plain = pipe("a red circle", **kw).images
    name = pipe.load_lora_weights(a)
    pipe.set_adapters([name], [0.5])
    unfused = pipe("a red circle", **kw).images
    pipe.fuse_lora()
    fused = pipe("a red circle", **kw).images
    merged_sd = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    restored = pipe("a red circle", **kw).images
    scale = plain.abs().max()  # the tiny random model's latents are large: compare relative to them
    assert (unfused - plain).abs().max() > 1e-2 * scale and (fused - unfused).abs().max() <= 1e-5 * scale
    # unfusing rounds the weights back to ~1e-7; two guided steps amplify that to ~1e-6 of the latents
    assert (restored - plain).abs().max() <= 5e-6 * scale
    assert max((pipe.transformer.state_dict()[k] - base[k]).abs().max().item() for k in base) <= 1e-6

    assert main(["lora", "merge", str(folder / "transformer"), str(a), str(tmp_path / "m.safetensors"), "--scale", "0.5"]) == 0
    merged = load_transformer(tmp_path / "m.safetensors").state_dict()
    assert set(merged) == set(merged_sd)
    assert max((merged[k] - merged_sd[k]).abs().max().item() for k in merged) <= 1e-6
    assert load_transformer(tmp_path / "m.safetensors").history[-1]["transition"] == "lora_merge"


def test_merge_of_a_lora_for_another_model_is_a_one_line_error(tmp_path, folder_and_loras, capsys):
    folder, (a, _) = folder_and_loras
    other = build_pipeline_folder(tmp_path / "other", hidden=64)
    assert main(["lora", "merge", str(other / "transformer"), str(a), str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("pixsigma lora: error: ") and "\n" not in err and "lora_A" in err and "-> 64 features" in err
    assert not (tmp_path / "m.safetensors").exists()
