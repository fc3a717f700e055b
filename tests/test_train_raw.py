"""Training from raw images with the encoders named in the config (data.vae, data.text_encoder),
against the same run given the encoders as built objects."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pixsigma.errors import PixsigmaError


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    """A folder with vae/, text_encoder/ and tokenizer/ (tiny random components), and the objects."""
    tc = pytest.importorskip("tests.tiny_components")
    from pixsigma.text import TextEncoder

    root = tmp_path_factory.mktemp("enc")
    tok, tok_dir = tc.build_tokenizer(root / "spm")
    shutil.copytree(tok_dir, root / "tokenizer")
    te = tc.build_text_encoder(len(tok))
    te.save_pretrained(root / "text_encoder")
    vae = tc.build_vae(levels=3, channels=32, groups=32)  # factor 4: 32px images → 8×8 latents
    vae.save_pretrained(root / "vae")
    return root, TextEncoder(root / "text_encoder", root / "tokenizer"), vae


def _images(folder, n=4):
    folder.mkdir()
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        recs.append({"path": f"{i}.png", "height": 32, "width": 32, "ratio": 1.0, "prompt": f"a red cat {i}"})
    (folder / "data_info.json").write_text(json.dumps(recs))
    return folder


def _config(data, out, **data_keys):
    from pixsigma.train.config import config_from_dict

    return config_from_dict({
        "model": {"preset": "tiny", "overrides": {"caption_channels": 32, "max_caption_tokens": 16}},
        "data": {"path": str(data), "resolution": 32, **data_keys},
        "optim": {"name": "adamw", "lr": 1e-3, "warmup_steps": 0, "ema_decay": 0.0},
        "schedule": {"max_steps": 2, "batch_size": 2, "log_every": 1, "deterministic": True},
        "checkpointing": {"every": 0, "export": "model"}, "output": {"dir": str(out), "tensorboard": False}})


def test_raw_images_with_encoders_from_the_config(tmp_path, encoder_folder):
    from pixsigma.train.loop import train

    root, text, vae = encoder_folder
    data = _images(tmp_path / "data")
    by_path = train(_config(data, tmp_path / "by_path", vae=str(root / "vae"), text_encoder=str(root)))
    given = train(_config(data, tmp_path / "given"), text_encoder=text, vae=vae)
    losses = lambda d: [json.loads(l)["loss"] for l in open(d / "log.jsonl") if '"loss"' in l]  # noqa: E731
    assert len(losses(tmp_path / "by_path")) == 2
    np.testing.assert_allclose(losses(tmp_path / "by_path"), losses(tmp_path / "given"), rtol=1e-6)
    a, b = load_file(by_path), load_file(given)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_raw_images_without_encoders_is_one_error(tmp_path, encoder_folder):
    from pixsigma.train.loop import train

    root, _, _ = encoder_folder
    data = _images(tmp_path / "data")
    with pytest.raises(PixsigmaError, match="needs data.vae"):
        train(_config(data, tmp_path / "a", text_encoder=str(root)))
    with pytest.raises(PixsigmaError, match="needs data.text_encoder"):
        train(_config(data, tmp_path / "b", vae=str(root / "vae")))
    with pytest.raises(PixsigmaError, match="no config.json"):
        train(_config(data, tmp_path / "c", vae=str(tmp_path), text_encoder=str(root)))
