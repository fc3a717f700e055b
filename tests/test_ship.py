"""Shipping a model folder: `pixsigma.toy.ship.ship` and the `pixsigma ship` command."""

import filecmp
import json

import pytest
import torch

from pixsigma import cli
from pixsigma.errors import PixsigmaError
from pixsigma.model.checkpoint import load_transformer, save_safetensors
from pixsigma.toy.ship import ship
from tests.tiny_components import build_transformer, build_vae

SHIPPED_ENTRIES = ["MODEL_CARD.md", "model_index.json", "transformer", "vae"]


@pytest.fixture
def trained(tmp_path):
    """A VAE folder and a transformer checkpoint (fp32, with a recorded transition), as a run leaves them."""
    build_vae().save_pretrained(tmp_path / "vae")
    model = build_transformer()
    model.history = [{"action": "resolution", "resolution": 64}]
    save_safetensors(model, tmp_path / "model.safetensors")
    return tmp_path / "vae", tmp_path / "model.safetensors", model


def _assert_fp16_copy(path, model):
    shipped = load_transformer(path)
    reference = model.state_dict()
    assert sorted(shipped.state_dict()) == sorted(reference)
    for key, value in reference.items():
        stored = shipped.state_dict()[key]
        assert stored.dtype == (torch.float16 if value.is_floating_point() else value.dtype), key
        torch.testing.assert_close(stored, value.to(stored.dtype), rtol=0, atol=0)


def _assert_same_folder(a, b):
    cmp = filecmp.dircmp(a, b)
    assert not (cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files), cmp.report()
    for name in cmp.common_files:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


def test_ship_writes_model_vae_index_and_card_and_no_logs(trained, tmp_path):
    """ship() writes fp16 weights, the VAE folder byte for byte, the model index and a card, and
    replaces the old folder whole: its logs and previous_* reports are not carried over."""
    vae, weights, model = trained
    dest = tmp_path / "default_model"
    (dest / "logs" / "previous_a").mkdir(parents=True)
    (dest / "logs" / "previous_a" / "adherence_20.json").write_text('{"overall": 0.1}')
    (dest / "logs" / "stale.log").write_text("old run")

    assert ship(vae, weights, dest=dest) == dest
    assert sorted(p.name for p in dest.iterdir()) == SHIPPED_ENTRIES
    assert [p.name for p in (dest / "transformer").iterdir()] == ["model.safetensors"]
    _assert_fp16_copy(dest / "transformer" / "model.safetensors", model)
    _assert_same_folder(vae, dest / "vae")
    index = json.loads((dest / "model_index.json").read_text())
    assert index["pixsigma_unconditional"] == "empty_prompt"
    assert index["history"] == [{"action": "resolution", "resolution": 64}]
    card = (dest / "MODEL_CARD.md").read_text()
    n_params = sum(p.numel() for p in model.parameters())
    assert f"{n_params:,} parameters" in card and f"depth {len(model.blocks)}" in card
    assert "resolution=64" in card
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_ship_copies_a_given_model_card(trained, tmp_path):
    vae, weights, _ = trained
    card = tmp_path / "card.md"
    card.write_text("# a model\n\n| held-out | 21.5% |\n", encoding="utf-8")
    ship(vae, weights, dest=tmp_path / "out", model_card=card)
    assert (tmp_path / "out" / "MODEL_CARD.md").read_bytes() == card.read_bytes()


def test_ship_failure_leaves_the_previous_folder(trained, tmp_path, monkeypatch):
    import pixsigma.toy.ship as ship_module

    vae, weights, _ = trained
    dest = tmp_path / "default_model"
    dest.mkdir()
    (dest / "model_index.json").write_text("{}")

    def broken_copy(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ship_module.shutil, "copytree", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        ship(vae, weights, dest=dest)
    assert sorted(p.name for p in dest.iterdir()) == ["model_index.json"]
    assert (dest / "model_index.json").read_text() == "{}"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_ship_logs_dir_is_deprecated_and_ignored(trained, tmp_path):
    vae, weights, _ = trained
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "stage.log").write_text("step 1\n")
    with pytest.warns(DeprecationWarning, match="logs"):
        ship(vae, weights, logs_dir=runs, dest=tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == SHIPPED_ENTRIES


def test_ship_rejects_missing_inputs(trained, tmp_path):
    vae, weights, _ = trained
    with pytest.raises(PixsigmaError, match="AutoencoderKL"):
        ship(tmp_path / "nowhere", weights, dest=tmp_path / "out")
    with pytest.raises(PixsigmaError, match="card"):
        ship(vae, weights, dest=tmp_path / "out", model_card=tmp_path / "missing.md")
    assert not (tmp_path / "out").exists()


def test_cli_ship_round_trip(trained, tmp_path):
    from pixsigma.vae import VAE

    vae, weights, model = trained
    card = tmp_path / "card.md"
    card.write_text("# card\n")
    dest = tmp_path / "shipped"
    assert cli.main(["ship", "--vae", str(vae), "--transformer", str(weights), "--dest", str(dest),
                     "--model-card", str(card)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == SHIPPED_ENTRIES
    _assert_fp16_copy(dest / "transformer" / "model.safetensors", model)
    assert (dest / "MODEL_CARD.md").read_text() == "# card\n"
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(VAE(dest / "vae").encode(x), VAE(vae).encode(x), rtol=0, atol=0)


def test_cli_ship_missing_transformer_is_one_line_error(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PIXSIGMA_DEBUG", raising=False)
    vae, _, _ = trained
    missing = tmp_path / "no_such_model.safetensors"
    dest = tmp_path / "shipped"
    assert cli.main(["ship", "--vae", str(vae), "--transformer", str(missing), "--dest", str(dest)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("pixsigma ship: error:") and "no_such_model.safetensors" in err
    assert not dest.exists()
