"""`pixsigma train-vae`: a small AutoencoderKL learns the toy images; decoder-only fine-tuning
keeps the latent space (encoder and scaling factor) bit-identical."""

import itertools
import json

import numpy as np
import pytest
import torch

from pixsigma.cli import main
from pixsigma.errors import PixsigmaError
from pixsigma.toy.render import generate
from pixsigma.train.vae import VAETrainConfig, image_batches, images_to_tensor, object_mask_weight, train_vae
from pixsigma.vae import load_autoencoder

TINY = dict(size=16, block_out_channels=(8, 16), norm_num_groups=4, batch_size=4, lr=2e-3, save_every=1000)


def toy_images(seed=0, start=0, size=16):
    """The endless stream of toy images (item i from (seed, i)), as `pixsigma train-vae` feeds it."""
    return (image for image, *_ in generate(None, seed=seed, size=size, start=start))


def calibration(seed=0, n=16):
    return list(itertools.islice(toy_images(seed, start=10**7), n))


def _rec(vae, batch):
    with torch.no_grad():
        recon = vae.decode(vae.encode(batch).latent_dist.mean).sample
    return (recon - batch).abs().mean().item()


def test_train_then_decoder_only_keeps_the_latent_space(tmp_path):
    torch.set_num_threads(1)
    held = images_to_tensor(itertools.islice(toy_images(seed=9), 8))
    train_vae(tmp_path / "a", toy_images(), VAETrainConfig(**TINY, steps=1), calibration=calibration())
    train_vae(tmp_path / "b", toy_images(), VAETrainConfig(**TINY, steps=60), calibration=calibration())
    first, trained = load_autoencoder(tmp_path / "a"), load_autoencoder(tmp_path / "b")
    assert _rec(trained, held) < 0.7 * _rec(first, held)
    meta = json.loads((tmp_path / "b" / "pixsigma_train.json").read_text())
    assert meta["step"] == 60 and abs(trained.config.scaling_factor * meta["latent_std"] - 1) < 1e-6

    train_vae(tmp_path / "c", toy_images(start=5 * 10**6), VAETrainConfig(**TINY, steps=20, decoder_only=True, object_weight=4.0),
              init_from=tmp_path / "b")
    tuned = load_autoencoder(tmp_path / "c")
    before, after = trained.state_dict(), tuned.state_dict()
    for name in before:
        same = torch.equal(before[name], after[name])
        if name.startswith(("encoder.", "quant_conv.")):
            assert same, name
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("decoder."))
    assert tuned.config.scaling_factor == trained.config.scaling_factor


def test_decoder_only_needs_a_vae_to_start_from(tmp_path):
    with pytest.raises(PixsigmaError, match="init-from"):
        train_vae(tmp_path / "x", toy_images(), VAETrainConfig(**TINY, steps=1, decoder_only=True))


def test_object_weight_marks_pixels_off_the_background():
    images = torch.full((1, 3, 8, 8), -0.5)
    images[0, :, 2:4, 2:4] = 0.8  # a 2×2 object on a plain background
    weight = object_mask_weight(images, 5.0)
    assert weight.shape == (1, 1, 8, 8)
    assert weight[0, 0, 2:4, 2:4].eq(5.0).all() and weight.sum().item() == 60 + 4 * 5
    assert object_mask_weight(images, 1.0).eq(1.0).all()


# --------------------------------------------------------------------------- the images it takes


def test_image_batches_scale_to_minus_one_one_and_repeat_collections():
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.full((4, 4, 3), 255, np.uint8)
    c = np.full((4, 4, 3), 51, np.uint8)  # 51 / 127.5 - 1 = -0.6
    batches = image_batches([a, b, c], 2)
    first, second = next(batches), next(batches)
    assert first.shape == (2, 3, 4, 4) and first.dtype == torch.float32
    assert first[0].eq(-1).all() and first[1].eq(1).all()
    # the list starts over: [c, a], then [b, c]
    torch.testing.assert_close(second[0], torch.full((3, 4, 4), -0.6), rtol=0, atol=1e-7)
    assert second[1].eq(-1).all() and next(batches)[0].eq(1).all()
    short = list(image_batches([a, b, c], 2, repeat=False))
    assert [len(x) for x in short] == [2, 1]


def test_bad_image_streams_are_one_line_errors():
    a = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(PixsigmaError, match="ran out after 3"):
        list(itertools.islice(image_batches(iter([a, a, a]), 2), 3))
    with pytest.raises(PixsigmaError, match="no training images"):
        next(image_batches([], 2))
    with pytest.raises(PixsigmaError, match="one size"):
        images_to_tensor([a, np.zeros((5, 4, 3), np.uint8)])


def test_train_vae_takes_a_list_and_measures_the_factor_on_it(tmp_path):
    """A list is repeated as needed and its first batches set the scaling factor; a one-shot
    iterator needs explicit calibration images; the old call without images is refused."""
    torch.set_num_threads(1)
    images = list(itertools.islice(toy_images(seed=3), 6))
    config = VAETrainConfig(**{**TINY, "batch_size": 2, "steps": 4})
    train_vae(tmp_path / "v", images, config)
    vae = load_autoencoder(tmp_path / "v")
    with torch.no_grad():  # the std of the latents' means over the first 4 batches: all 6 images, once
        x = images_to_tensor(images)
        std = vae.encode(x).latent_dist.mean.std().item()
    assert abs(vae.config.scaling_factor * std - 1) < 1e-4
    with pytest.raises(PixsigmaError, match="calibration"):
        train_vae(tmp_path / "w", iter(images), config)
    with pytest.raises(PixsigmaError, match="images come first"):
        train_vae(tmp_path / "w", config)
    with pytest.raises(PixsigmaError, match="expected 16x16"):
        train_vae(tmp_path / "w", list(itertools.islice(toy_images(size=32), 4)), config)


# --------------------------------------------------------------------------- the command


def test_cli_trains_on_the_toy_stream(tmp_path, monkeypatch):
    """The scaling factor the command writes is 1 / std of the latents of the toy images it
    documents as its calibration set (items 10^7 onward of its seed), recomputed here."""
    torch.set_num_threads(1)
    out = tmp_path / "vae"
    assert main(["train-vae", str(out), "--size", "16", "--steps", "2", "--batch-size", "2", "--seed", "4"]) == 0
    meta = json.loads((out / "pixsigma_train.json").read_text())
    assert meta["step"] == 2 and meta["config"]["size"] == 16 and meta["config"]["seed"] == 4
    vae = load_autoencoder(out)
    assert vae.config.sample_size == 16 and list(vae.config.block_out_channels) == [32, 64, 64]
    with torch.no_grad():
        x = images_to_tensor(itertools.islice(toy_images(seed=4, start=10**7), 8))
        std = vae.encode(x).latent_dist.mean.std().item()
    assert abs(vae.config.scaling_factor * std - 1) < 1e-4


@pytest.mark.parametrize("flags, message", [
    (["--size", "18"], "not divisible"),
    (["--batch-size", "0"], "batch_size must be at least 1"),
    (["--decoder-only"], "init-from"),
    (["--init-from", "does/not/exist"], "does/not/exist"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.delenv("PIXSIGMA_DEBUG", raising=False)
    rc = main(["train-vae", str(tmp_path / "vae"), "--steps", "1", *flags])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("pixsigma train-vae: error:") and message in lines[-1], err
    assert "Traceback" not in err and not (tmp_path / "vae").exists()
