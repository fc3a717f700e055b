"""`pixsigma adapt`: every subcommand through the CLI, the layer syntax, and bad input."""

import json

import pytest
import torch

from pixsigma.cli import main

DEPTH = 28  # the released depth, so that the layer examples of the docs apply as written


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from pixsigma.model import TINY, PixArtSigmaTransformer, save_transformer

    torch.manual_seed(0)
    model = PixArtSigmaTransformer(TINY.with_(depth=DEPTH, hidden_size=32, num_heads=2, sample_size=8))
    with torch.no_grad():  # the from-scratch init zeroes the output layer: randomize it so outputs differ
        torch.nn.init.normal_(model.final_layer.linear.weight, std=0.3)
    return save_transformer(model, tmp_path_factory.mktemp("adapt") / "base.safetensors")


def _load(path):
    from pixsigma.model import load_transformer

    return load_transformer(path)


@pytest.mark.parametrize("spec, layers", [
    ("deep", tuple(range(14, 28))),
    ("14-27", tuple(range(14, 28))),
    ("3,5,7", (3, 5, 7)),
    ("0-2,27", (0, 1, 2, 27)),
    ("all", tuple(range(28))),
])
def test_kv_compress_layer_syntax(tmp_path, base, spec, layers):
    out = tmp_path / "kv.safetensors"
    assert main(["adapt", "kv-compress", str(base), str(out), "--layers", spec, "--operator", "ave", "--ratio", "3"]) == 0
    kv = _load(out).config.kv_compress
    assert kv.layers == layers and kv.operator == "ave" and kv.ratio == 3


@pytest.mark.parametrize("spec, message", [
    ("3-x", "expected 'deep', 'all', a range like 14-27 or a list like 3,5,7"),
    ("28", "indices must lie in 0..27"),
    ("5-3", "indices must lie in 0..27"),  # an empty range selects nothing
])
def test_kv_compress_bad_layer_spec_is_one_line(tmp_path, base, capsys, spec, message):
    out = tmp_path / "kv.safetensors"
    assert main(["adapt", "kv-compress", str(base), str(out), "--layers", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and err.startswith("pixsigma adapt: error:")
    assert not out.exists()


def test_every_other_subcommand(tmp_path, base):
    src = _load(base)
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"latent_channels": 4, "block_out_channels": [8, 8, 8], "scaling_factor": 0.5}))
    assert main(["adapt", "vae", str(base), str(tmp_path / "a.safetensors"), "--vae", str(vae)]) == 0
    a = _load(tmp_path / "a.safetensors")
    assert a.history[-1]["action"] == "vae" and a.history[-1]["factor"] == 4 and a.history[-1]["scaling_factor"] == 0.5

    # the VAE factor recorded by `adapt vae` (4) sizes the new resolution: 64 px / 4 = 16 latent cells
    assert main(["adapt", "resolution", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--resolution", "64"]) == 0
    b = _load(tmp_path / "b.safetensors")
    assert b.config.sample_size == 16 and b.config.pe_interpolation == 2.0  # 8 → 16 cells: the PE scales with the size
    assert main(["adapt", "resolution", str(base), str(tmp_path / "b2.safetensors"), "--resolution", "128", "--vae-factor", "8",
                 "--pe-interpolation", "1.5"]) == 0
    assert _load(tmp_path / "b2.safetensors").config.pe_interpolation == 1.5

    assert main(["adapt", "tokens", str(base), str(tmp_path / "c.safetensors"), "--tokens", "24"]) == 0
    assert _load(tmp_path / "c.safetensors").config.max_caption_tokens == 24

    # depth: new blocks start as identities, so the output equals the source model's
    assert main(["adapt", "depth", str(base), str(tmp_path / "d.safetensors"), "--add", "2", "--at", "5"]) == 0
    d = _load(tmp_path / "d.safetensors")
    assert d.config.depth == DEPTH + 2
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    cap = torch.randn(1, 5, src.config.caption_channels, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(d.eval()(x, t, cap), src.eval()(x, t, cap), rtol=1e-5, atol=1e-6)
    assert not torch.equal(src(x, t, cap), torch.zeros_like(src(x, t, cap)))


def test_bad_input_is_one_line(tmp_path, base, capsys):
    cases = [
        (["resolution", str(base), str(tmp_path / "r.safetensors"), "--resolution", "60"], "must be a positive multiple of 16"),
        (["tokens", str(base), str(tmp_path / "t.pt"), "--tokens", "24"], "name it *.safetensors"),
        (["vae", str(base), str(tmp_path / "v.safetensors"), "--vae", str(tmp_path)], "config.json"),
        (["tokens", str(tmp_path / "missing.safetensors"), str(tmp_path / "m.safetensors"), "--tokens", "24"], "missing"),
    ]
    for args, message in cases:
        assert main(["adapt", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, (args, err)
