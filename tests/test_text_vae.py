"""Text encoder (T5 + MiniLM, truncation, cache, cleaning) and VAE (scaling, tiled decoding)."""

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pixsigma.errors import PixsigmaError
from pixsigma.text import TextEncoder, clean_caption, minilm_path
from pixsigma.vae import VAE
from tests.tiny_components import build_text_encoder, build_tokenizer, build_vae


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    tok, tok_dir = build_tokenizer(root / "spm")
    build_text_encoder(len(tok)).save_pretrained(root / "text_encoder")
    return root / "text_encoder", tok_dir


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------


def test_t5_encode_shapes_and_mask(t5_folder):
    enc = TextEncoder(*t5_folder, max_length=12)
    assert enc.model_type == "t5" and enc.hidden_size == 32
    emb, mask = enc.encode(["a red cat", ""])
    assert emb.shape == (2, 12, 32) and mask.shape == (2, 12)
    assert mask.dtype == torch.long and emb.is_floating_point()
    assert mask[1].sum() == 1  # "" is just </s>
    assert 1 < mask[0].sum() < 12
    # padding does not change the valid tokens' states (batch independence)
    alone, _ = enc.encode("a red cat")
    n = int(mask[0].sum())
    assert torch.allclose(alone[0, :n], emb[0, :n], atol=1e-5)


def test_truncation_warns_once_with_count(t5_folder, caplog):
    enc = TextEncoder(*t5_folder, max_length=8)
    long = "a photo of a red cat sitting on a wooden table by the sea at sunset"
    full = len(enc.tokenizer(long).input_ids)
    with caplog.at_level(logging.WARNING, logger="pixsigma"):
        emb, mask = enc.encode([long, "a cat"])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"{full - 8} token(s) dropped" in warnings[0].getMessage()
    assert emb.shape[1] == 8 and mask[0].sum() == 8


def test_cache_hit_is_identical(t5_folder, tmp_path):
    enc = TextEncoder(*t5_folder, max_length=10, cache_dir=tmp_path / "cache")
    a, ma = enc.encode(["a blue house", "a cat"])
    files = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 2
    calls = []
    orig = enc.model.forward
    enc.model.forward = lambda *a_, **k: calls.append(1) or orig(*a_, **k)
    b, mb = enc.encode(["a blue house", "a cat"])
    assert not calls  # served from disk
    assert torch.equal(a, b) and torch.equal(ma, mb)
    # another max_length is another key
    enc.encode(["a blue house"], max_length=6)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3


def test_lowercase_and_cleaning(t5_folder):
    enc = TextEncoder(*t5_folder, max_length=10, lowercase=True)
    assert enc.preprocess("  A Red CAT ") == "a red cat"
    assert TextEncoder(*t5_folder, max_length=10).preprocess("A Red CAT") == "A Red CAT"
    text = clean_caption("Look at https://example.com/x.png <b>A Cat</b> @someone *** on a mat!!")
    assert "http" not in text and "<b>" not in text and "@someone" not in text and "*" not in text
    assert "A Cat" in text  # case kept by default
    assert clean_caption("A Cat", lowercase=True) == "a cat"


def test_bad_folders(tmp_path):
    with pytest.raises(PixsigmaError, match="does not exist"):
        TextEncoder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PixsigmaError, match="config.json"):
        TextEncoder(tmp_path / "empty")


def test_minilm_offline():
    """The packaged MiniLM loads with the hub switched off and gives (B, L, 384)."""
    assert (minilm_path() / "config.json").is_file()
    code = textwrap.dedent("""
        from pixsigma.text import TextEncoder, minilm_path
        enc = TextEncoder(minilm_path(), max_length=20)
        emb, mask = enc.encode(["a small cactus with a happy face", "an astronaut"])
        print(tuple(emb.shape), tuple(mask.shape), enc.hidden_size, bool(emb.isfinite().all()))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "(2, 20, 384) (2, 20) 384 True"


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------


def test_vae_factor_scaling_and_roundtrip_shapes():
    vae = VAE(build_vae(2, 32, 32))
    assert vae.factor == 2 and vae.scaling_factor == pytest.approx(0.13025) and vae.shift_factor == 0.0
    images = torch.rand(2, 3, 16, 24)
    z = vae.encode(images)
    assert z.shape == (2, 4, 8, 12)
    raw = vae.model.encode(images * 2 - 1).latent_dist.mode()
    assert torch.allclose(z, raw * 0.13025, atol=1e-6)
    out = vae.decode(z)
    assert out.shape == (2, 3, 16, 24) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(PixsigmaError):
        vae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(PixsigmaError):
        vae.encode(torch.zeros(1, 3, 15, 16))


def test_vae_shift_factor_honored():
    ae = build_vae(2, 32, 32)
    ae.register_to_config(shift_factor=0.25)
    vae = VAE(ae)
    assert vae.shift_factor == 0.25
    z = torch.randn(1, 4, 8, 8)
    expected = (vae.model.decode(z / vae.scaling_factor + 0.25).sample / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(vae.decode(z, tiled=False), expected, atol=1e-6)


def test_vae_tile_sizes_follow_factor():
    assert VAE(build_vae(2, 32, 32)).tile_latent == 512  # 1024 px tiles at factor 2
    assert VAE(build_vae(2, 32, 32), tile_size=512).tile_latent == 256
    v8 = VAE(build_vae(4, 8, 4, layers_per_block=0, mid_attention=False))
    assert v8.factor == 8 and v8.tile_latent == 128 and v8.overlap_latent == 16
    assert v8.should_tile(256, 256)  # 2048 px output
    assert not v8.should_tile(64, 64)
    assert v8.tile_starts(128) == [0]
    starts = v8.tile_starts(400)
    assert starts[0] == 0 and starts[-1] == 400 - 128
    assert all(b - a <= 128 - 16 for a, b in zip(starts, starts[1:]))
    # a tight memory budget shrinks the tiles (a 128-channel decoder: ~2 GiB at 1024², 0.5 at 512²)
    wide = VAE(build_vae(4, 128, 32, layers_per_block=0, mid_attention=False), memory_budget=2**30)
    assert wide.tile_latent == 64 and wide.should_tile(128, 128)  # 512 px: 768² would need 1.1 GiB


def _seam_lines(vae: VAE, latent_len: int) -> list[int]:
    """Output pixel lines on both sides of every tile edge along one axis (where a tile starts
    or ends inside the image)."""
    f, t = vae.factor, vae.tile_latent
    starts = vae.tile_starts(latent_len)
    edges = {s * f for s in starts[1:]} | {(s + t) * f for s in starts[:-1] if s + t < latent_len}
    return sorted(r for e in edges for r in (e - 1, e))


@pytest.mark.parametrize("levels,channels,groups,height,width", [(2, 32, 32, 56, 40), (4, 8, 4, 40, 56)])
def test_tiled_decode_matches_untiled_without_seams_on_both_axes(levels, channels, groups, height, width):
    """Tiled against untiled decoding of a non-square latent: small everywhere, and no larger along
    the tile edges, horizontal (rows) or vertical (columns), than between them.

    Tiling changes the output a little everywhere (group-norm statistics and the mid-block
    attention see one tile, not the whole latent), about 7e-3 mean abs on a 0..1 scale. Blending
    the tiles with flat weights instead of linear ramps roughly triples the error on the edge
    lines and multiplies the worst edge line by about six; the bounds below sit well between."""
    vae = VAE(build_vae(levels, channels, groups), tile_latent=24, overlap_latent=8)
    torch.manual_seed(0)
    z = torch.randn(1, 4, height, width)
    full = vae.decode(z, tiled=False)
    tiled = vae.decode(z, tiled=True)
    assert tiled.shape == full.shape == (1, 3, height * vae.factor, width * vae.factor)
    diff = (full - tiled).abs()[0].mean(0)  # (H, W): error per output pixel
    assert diff.mean() < 2e-2
    for axis, latent_len in ((0, height), (1, width)):  # axis 0: rows (horizontal edges), 1: columns
        lines = _seam_lines(vae, latent_len)
        assert len(lines) >= 4, "the latent must put at least two tile edges on this axis"
        interior = [r for r in range(latent_len * vae.factor) if r not in lines]
        err = diff.mean(dim=1 - axis)  # mean error of each row (axis 0) or column (axis 1)
        assert err[lines].mean() < 1.25 * err[interior].mean(), axis
        assert err[lines].max() < 1.5 * err[interior].mean(), axis
        # no step across a tile edge beyond what the untiled image has between the same lines
        jump_t = tiled.diff(dim=2 + axis).abs().mean(dim=(0, 1, 3 - axis))
        jump_f = full.diff(dim=2 + axis).abs().mean(dim=(0, 1, 3 - axis))
        assert (jump_t - jump_f).abs().max() < 0.01, axis


def test_tiled_decode_is_exact_for_a_pixelwise_decoder():
    """With a decoder that maps each latent pixel to its own f×f output block (no context at all),
    a correct tiling reproduces the untiled output exactly, along rows and columns alike: any
    misplaced tile, weights that do not sum to one, or an edge left uncovered shows here."""
    vae = VAE(build_vae(3, 8, 4, layers_per_block=0, mid_attention=False), tile_latent=10, overlap_latent=3)
    f = vae.factor

    def pixelwise(z):  # (1, 4, h, w) → (1, 3, h·f, w·f), nonlinear so blending errors cannot cancel
        rgb = torch.tanh(z[:, :3] * 0.7 + z[:, 3:] ** 2 * 0.1)
        return rgb.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)

    vae._decode_raw = pixelwise
    torch.manual_seed(1)
    z = torch.randn(1, 4, 27, 30)  # 4 × 4 tiles, the last of each axis flush with the edge
    assert len(vae.tile_starts(27)) == 4 and len(vae.tile_starts(30)) == 4
    tiled, full = vae.decode(z, tiled=True), vae.decode(z, tiled=False)
    assert torch.allclose(tiled, full, atol=1e-6, rtol=0)


def test_shipped_vae_scaling_factor_gives_unit_variance_latents():
    """The shipped VAE's stored scaling_factor, applied to images it was not fitted on, gives
    scaled latents with a standard deviation of 1 ± 10%: both the posterior mean (what the factor
    is fitted to) and posterior samples (what training draws). The images are toy scenes from a
    seed the VAE never trained on, compositions held out from the training data included; the std
    is taken in float64 over every latent value."""
    import json

    import numpy as np

    import pixsigma
    from pixsigma.toy.render import generate

    folder = Path(pixsigma.__file__).parent / "assets" / "default_model" / "vae"
    scaling = json.loads((folder / "config.json").read_text())["scaling_factor"]
    vae = VAE(folder)
    assert vae.scaling_factor == scaling and vae.shift_factor == 0.0
    scenes = generate(48, seed=20240917, size=64, exclude_heldout=False)
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im, *_ in scenes])).permute(0, 3, 1, 2) / 255.0
    mean = vae.encode(x).double()
    sample = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(0)).double()
    assert mean.shape == (48, 4, 16, 16)  # factor 4
    assert 0.9 < mean.std().item() < 1.1
    assert 0.9 < sample.std().item() < 1.1


def test_vae_loader_reads_vae_and_pipeline_folders(tmp_path):
    """One loader for every caller: a VAE folder or a pipeline folder's vae/, trainable or frozen,
    with one-line errors; the feature cache's names are the same functions."""
    import pixsigma.data.cache as cache
    from pixsigma.vae import autoencoder, load_autoencoder, scale_latents, unscale_latents, vae_info

    ae = build_vae(2, 32, 32)
    ae.save_pretrained(tmp_path / "pipe" / "vae")
    trainable = load_autoencoder(tmp_path / "pipe" / "vae")
    frozen = load_autoencoder(tmp_path / "pipe", frozen=True)
    for loaded in (trainable, frozen):
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ae.state_dict().values()))
    assert all(p.requires_grad for p in trainable.parameters()) and not any(p.requires_grad for p in frozen.parameters())
    assert not frozen.training
    wrapped = VAE(tmp_path / "pipe")
    assert autoencoder(wrapped) is wrapped.model and autoencoder(ae) is ae
    assert vae_info(wrapped) == vae_info(ae) == wrapped.info == {"factor": 2, "latent_channels": 4, "scaling_factor": 0.13025, "shift_factor": 0.0}
    z = torch.randn(2, 4, 3, 3)
    info = {"scaling_factor": 0.5, "shift_factor": 0.25}
    assert torch.equal(scale_latents(z, info), (z - 0.25) * 0.5)
    assert torch.allclose(unscale_latents(scale_latents(z, info), info), z, atol=1e-6)
    assert (cache.autoencoder, cache.vae_info, cache.scale_latents) == (autoencoder, vae_info, scale_latents)
    assert not any(p.requires_grad for p in cache.load_vae(tmp_path / "pipe").parameters())
    (tmp_path / "empty").mkdir()
    with pytest.raises(PixsigmaError, match="no config.json; expected a diffusers AutoencoderKL folder"):
        load_autoencoder(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    with pytest.raises(PixsigmaError, match="no diffusion_pytorch_model.safetensors"):
        VAE(tmp_path / "noweights")
