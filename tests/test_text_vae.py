"""Text encoder (T5 + MiniLM, truncation, cache, cleaning) and VAE (scaling, tiled decoding)."""

import logging
import os
import subprocess
import sys
import textwrap

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


@pytest.mark.parametrize("levels,channels,groups,size", [(2, 32, 32, 56), (4, 8, 4, 40)])
def test_tiled_decode_matches_untiled_without_seams(levels, channels, groups, size):
    vae = VAE(build_vae(levels, channels, groups), tile_latent=24, overlap_latent=8)
    torch.manual_seed(0)
    z = torch.randn(1, 4, size, size)
    full = vae.decode(z, tiled=False)
    tiled = vae.decode(z, tiled=True)
    assert tiled.shape == full.shape
    diff = (full - tiled).abs()
    # Measured: ~8.8e-3 (factor 2) and ~8e-3 (factor 8) mean abs on a 0..1 scale: group-norm
    # statistics and the mid-block attention see one tile instead of the whole latent.
    assert diff.mean() < 2e-2
    f = vae.factor
    starts = vae.tile_starts(size)
    seams = sorted({s * f for s in starts[1:]} | {(s + 24) * f for s in starts[:-1] if (s + 24) * f < size * f})
    rows = [r for s in seams for r in (s - 1, s)]
    interior = [r for r in range(size * f) if r not in rows]
    row_err = diff.mean(dim=(0, 1, 3))
    assert row_err[rows].mean() < 2 * row_err[interior].mean()
    # no jump across the tile borders beyond what the untiled image has
    jump_t = (tiled[..., 1:, :] - tiled[..., :-1, :]).abs().mean(dim=(0, 1, 3))
    jump_f = (full[..., 1:, :] - full[..., :-1, :]).abs().mean(dim=(0, 1, 3))
    assert (jump_t - jump_f).abs().max() < 0.02
