"""Quantization through the pipeline and the CLI: every mode generates, a saved quantized
checkpoint loads as the pipeline's transformer with identical latents, bad modes are one line."""

from __future__ import annotations

import pytest
import torch

from pixsigma import cli
from pixsigma.errors import PixsigmaError
from pixsigma.model.quantize import MODES, SVDQuantLinear, save_quantized
from pixsigma.pipeline import SigmaPipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory, single_thread):
    from tests.tiny_components import build_pipeline_folder

    return build_pipeline_folder(tmp_path_factory.mktemp("qpipe") / "pipe", hidden=64, caption_channels=64)


def latents(pipe, seed=0):
    return pipe("a red cat", num_inference_steps=3, output_type="latent", seed=seed).images


@pytest.fixture(scope="module")
def reference(folder):
    return latents(SigmaPipeline.from_pretrained(folder, dtype="bf16"))


@pytest.mark.parametrize("mode", MODES)
def test_pipeline_generates_in_each_mode(folder, reference, mode):
    pipe = SigmaPipeline.from_pretrained(folder, quantize=mode, text_encoder_quantize="int8" if mode != "int4" else "int4")
    assert pipe.transformer.quantization["mode"] == mode
    linear = pipe.transformer.blocks[0].mlp.fc1
    assert isinstance(linear, SVDQuantLinear) if mode == "svdquant" else type(linear.weight).__name__ in ("Int8Tensor", "Int4OpaqueTensor")
    out = latents(pipe)
    err = float((out - reference).norm() / reference.norm())
    assert torch.isfinite(out).all() and 0 < err < 0.5, err


def test_saved_quantized_checkpoint_loads_as_pipeline_transformer(folder, tmp_path):
    pipe = SigmaPipeline.from_pretrained(folder, quantize="svdquant")
    assert pipe.transformer.quantization["calibrated"]  # the calibration prompts ran
    path = save_quantized(pipe.transformer, tmp_path / "q.safetensors")
    again = SigmaPipeline.from_pretrained(folder, transformer=path)
    assert again.transformer.quantization["mode"] == "svdquant"
    assert torch.equal(latents(again), latents(pipe))
    with pytest.raises(PixsigmaError, match="already quantized"):
        again.quantize("int8")


def test_cli_generate_quantized_and_bad_modes(folder, tmp_path, capsys):
    out = tmp_path / "q.png"
    assert cli.main(["generate", "a cat", "--model", str(folder), "-o", str(out), "--steps", "2", "--seed", "0",
                     "--quantize", "int8", "--quantize-text-encoder", "int4"]) == 0
    from pixsigma.pngmeta import read_png_params

    params = read_png_params(out)
    assert params["quantize"] == "int8" and params["quantize_text_encoder"] == "int4"
    capsys.readouterr()
    for flags, message in ((["--quantize", "int3"], "unknown quantization mode 'int3'"),
                           (["--quantize-text-encoder", "svdquant"], "unknown text encoder quantization mode 'svdquant'")):
        assert cli.main(["generate", "a cat", "--model", str(folder), "-o", str(tmp_path / "x.png"), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


def test_lora_on_a_quantized_pipeline_and_cli(folder, tmp_path):
    """from_pretrained(quantize=...) then load_lora_weights changes the image; `generate --lora
    --quantize` combine and the PNG records both."""
    from pixsigma.model import lora as L
    from pixsigma.model.checkpoint import load_transformer
    from pixsigma.pngmeta import read_png_params

    model = load_transformer(folder / "transformer")
    L.add_lora(model, L.LoraSpec(rank=2, targets=("attention+mlp",)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in L.adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = L.save_lora(model, tmp_path / "l.safetensors")
    pipe = SigmaPipeline.from_pretrained(folder, quantize="int8")
    base, base_hash = latents(pipe), pipe.weights_hash()
    pipe.load_lora_weights(path)
    assert (latents(pipe) - base).abs().max() > 1e-2 and pipe.weights_hash() != base_hash
    with pytest.raises(PixsigmaError, match="re-quantize"):
        pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert torch.equal(latents(pipe), base) and pipe.weights_hash() == base_hash
    out = tmp_path / "ql.png"
    assert cli.main(["generate", "a cat", "--model", str(folder), "-o", str(out), "--steps", "2", "--seed", "0",
                     "--quantize", "int8", "--lora", f"{path}:0.5"]) == 0
    params = read_png_params(out)
    assert params["quantize"] == "int8" and params["lora"] == f"{path}:0.5"
