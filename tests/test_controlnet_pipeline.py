"""ControlNet in generation: SigmaPipeline(controlnet=...), control images, step gating, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pixsigma import cli
from pixsigma.errors import PixsigmaError
from pixsigma.model.controlnet import ControlNetTransformer
from pixsigma.model.controlnet_checkpoint import save_controlnet
from pixsigma.pipeline import SigmaPipeline
from pixsigma.pngmeta import read_png_params
from tests.test_controlnet import randomize_controlnet
from tests.tiny_components import build_pipeline_folder

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_pipeline_folder(tmp_path_factory.mktemp("pipe") / "p")


@pytest.fixture(scope="module")
def controlnet_file(folder, tmp_path_factory):
    """A ControlNet-only file on the folder's transformer, with random (non-zero) weights."""
    base = SigmaPipeline.from_pretrained(folder).transformer
    path = tmp_path_factory.mktemp("cn") / "control.safetensors"
    save_controlnet(randomize_controlnet(ControlNetTransformer.from_transformer(base, 1), seed=3), path)
    return path


@pytest.fixture(scope="module")
def control_png(tmp_path_factory):
    img = np.zeros((40, 24, 3), np.uint8)  # another size and aspect than the output: it is fitted
    img[10:30, 6:18] = 255
    path = tmp_path_factory.mktemp("img") / "control.png"
    Image.fromarray(img).save(path)
    return path


def run(pipe, **kwargs):
    return pipe("a red square", num_inference_steps=4, seed=7, output_type="latent", **kwargs).images


def test_pipeline_generates_under_control(folder, controlnet_file, control_png):
    plain = SigmaPipeline.from_pretrained(folder)
    pipe = SigmaPipeline.from_pretrained(folder, controlnet=controlnet_file)
    assert isinstance(pipe.controlnet, ControlNetTransformer) and pipe.controlnet.base_model is pipe.transformer
    reference = run(plain)
    assert torch.equal(run(pipe), reference)  # a loaded ControlNet without control image changes nothing
    controlled = run(pipe, control_image=control_png)
    assert (controlled - reference).abs().max() > 1e-3
    assert torch.equal(run(pipe, control_image=control_png, controlnet_conditioning_scale=0.0), reference)
    assert not torch.equal(run(pipe, control_image=control_png, control_type="canny"), controlled)
    images = pipe("a red square", num_inference_steps=2, seed=7, control_image=control_png).images
    assert images[0].size == (32, 32)


def test_control_applies_only_between_start_and_end(folder, controlnet_file, control_png, monkeypatch):
    pipe = SigmaPipeline.from_pretrained(folder, controlnet=controlnet_file)
    hooked = []
    forward = pipe.transformer.forward

    def spy(*args, block_hook=None, **kwargs):
        hooked.append(block_hook is not None)
        return forward(*args, block_hook=block_hook, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", spy)
    gated = run(pipe, control_image=control_png, control_guidance_start=0.25, control_guidance_end=0.75)
    assert hooked == [False, True, True, False]
    hooked.clear()
    run(pipe, control_image=control_png)
    assert hooked == [True] * 4
    hooked.clear()
    assert not torch.equal(gated, run(pipe, control_image=control_png))


def test_control_image_is_fitted_to_the_generation_size(folder, controlnet_file, control_png, monkeypatch):
    pipe = SigmaPipeline.from_pretrained(folder, controlnet=controlnet_file)
    seen = []
    encode = pipe.vae.encode

    def spy(images, *args, **kwargs):
        seen.append(images)
        return encode(images, *args, **kwargs)

    monkeypatch.setattr(pipe.vae, "encode", spy)
    out = pipe("a red square", num_inference_steps=1, seed=0, height=24, width=40, control_image=control_png)
    info = out.info
    assert tuple(seen[0].shape) == (1, 3, info["generated_height"], info["generated_width"])
    from pixsigma.data.control import read_control_image
    from pixsigma.resolution import resize_and_crop

    src = torch.from_numpy(read_control_image(control_png).copy()).permute(2, 0, 1)[None].float() / 255
    want = resize_and_crop(src, info["generated_height"], info["generated_width"]).clamp(0, 1)
    assert torch.equal(seen[0], want)  # the output's own resize + center crop


def test_pipeline_control_errors(folder, controlnet_file, control_png, tmp_path):
    plain = SigmaPipeline.from_pretrained(folder)
    with pytest.raises(PixsigmaError, match="a control image was given but the pipeline has no ControlNet"):
        run(plain, control_image=control_png)
    pipe = SigmaPipeline.from_pretrained(folder, controlnet=controlnet_file)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(PixsigmaError, match="broken.png: cannot read the control image"):
        run(pipe, control_image=tmp_path / "broken.png")
    with pytest.raises(PixsigmaError, match="2 channels"):
        run(pipe, control_image=np.zeros((32, 32, 2), np.uint8))
    with pytest.raises(PixsigmaError, match="expected 0 <= start < end <= 1"):
        run(pipe, control_image=control_png, control_guidance_start=0.9, control_guidance_end=0.1)
    with pytest.raises(PixsigmaError, match="trained on the base with weights hash"):
        SigmaPipeline.from_pretrained(build_pipeline_folder(tmp_path / "other", seed=1), controlnet=controlnet_file)


def test_cli_generate_with_control(folder, controlnet_file, control_png, tmp_path, capsys):
    out = tmp_path / "c.png"
    args = ["generate", "a red square", "--model", str(folder), "-o", str(out), "--steps", "2", "--seed", "1",
            "--controlnet", str(controlnet_file), "--control", str(control_png), "--control-type", "canny",
            "--control-scale", "0.5"]
    assert cli.main(args) == 0
    params = read_png_params(out)
    assert (params["control"], params["control_type"], params["control_scale"]) == (str(control_png), "canny", 0.5)
    plain = tmp_path / "plain.png"
    assert cli.main(["generate", "a red square", "--model", str(folder), "-o", str(plain), "--steps", "2", "--seed", "1"]) == 0
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(plain)))
    capsys.readouterr()
    (tmp_path / "bad.png").write_text("nope")
    bad = args[:]
    bad[bad.index(str(control_png))] = str(tmp_path / "bad.png")
    bad[bad.index(str(out))] = str(tmp_path / "x.png")
    assert cli.main(bad) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read the control image" in err and "Traceback" not in err
