"""`pixsigma train-vae`: a small AutoencoderKL learns the toy images; decoder-only fine-tuning
keeps the latent space (encoder and scaling factor) bit-identical."""

import json

import pytest
import torch

from pixsigma.errors import PixsigmaError
from pixsigma.train.vae import VAETrainConfig, object_mask_weight, toy_batches, train_vae
from pixsigma.vae import load_autoencoder

TINY = dict(size=16, block_out_channels=(8, 16), norm_num_groups=4, batch_size=4, lr=2e-3, save_every=1000)


def _rec(vae, batch):
    with torch.no_grad():
        recon = vae.decode(vae.encode(batch).latent_dist.mean).sample
    return (recon - batch).abs().mean().item()


def test_train_then_decoder_only_keeps_the_latent_space(tmp_path):
    torch.set_num_threads(1)
    held = next(toy_batches(VAETrainConfig(**{**TINY, "batch_size": 8, "seed": 9})))
    train_vae(tmp_path / "a", VAETrainConfig(**TINY, steps=1))
    train_vae(tmp_path / "b", VAETrainConfig(**TINY, steps=60))
    first, trained = load_autoencoder(tmp_path / "a"), load_autoencoder(tmp_path / "b")
    assert _rec(trained, held) < 0.7 * _rec(first, held)
    meta = json.loads((tmp_path / "b" / "pixsigma_train.json").read_text())
    assert meta["step"] == 60 and abs(trained.config.scaling_factor * meta["latent_std"] - 1) < 1e-6

    train_vae(tmp_path / "c", VAETrainConfig(**TINY, steps=20, decoder_only=True, object_weight=4.0), init_from=tmp_path / "b")
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
        train_vae(tmp_path / "x", VAETrainConfig(**TINY, steps=1, decoder_only=True))


def test_object_weight_marks_pixels_off_the_background():
    images = torch.full((1, 3, 8, 8), -0.5)
    images[0, :, 2:4, 2:4] = 0.8  # a 2×2 object on a plain background
    weight = object_mask_weight(images, 5.0)
    assert weight.shape == (1, 1, 8, 8)
    assert weight[0, 0, 2:4, 2:4].eq(5.0).all() and weight.sum().item() == 60 + 4 * 5
    assert object_mask_weight(images, 1.0).eq(1.0).all()
