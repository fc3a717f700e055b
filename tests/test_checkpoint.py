"""Checkpoint layouts: loading, inference of the config, round trips, bad input."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from pixsigma import PixsigmaError, convert, load_transformer
from pixsigma.model.checkpoint import (
    official_to_diffusers,
    save_diffusers,
    save_official,
    save_safetensors,
    save_transformer,
)
from pixsigma.model.transformer import TINY, KVCompressConfig, PixArtSigmaTransformer
from pixsigma.model.transitions import add_kv_compression
from tests.test_model import diffusers_twin, randomized, run_diffusers

SIGMA_LIKE = TINY.with_(hidden_size=144, num_heads=2, depth=3, caption_channels=40, max_caption_tokens=20,
                        sample_size=32, pe_interpolation=0.5)  # head dim 72, as the released files


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_official_pth_with_and_without_wrapper_and_pos_embed(tmp_path):
    model = randomized(SIGMA_LIKE)
    sd = model.state_dict()
    torch.save({"state_dict": {**sd, "pos_embed": torch.zeros(1, 256, 144)}}, tmp_path / "PixArt-Sigma-XL-2-256x256.pth")
    torch.save(dict(sd), tmp_path / "flat.pth")
    wrapped = load_transformer(tmp_path / "PixArt-Sigma-XL-2-256x256.pth")
    flat = load_transformer(tmp_path / "flat.pth", sample_size=32, pe_interpolation=0.5)
    for loaded in (wrapped, flat):
        assert loaded.config == SIGMA_LIKE  # heads from head dim 72, size from the name / overrides
        assert same_tensors(loaded.state_dict(), sd)


def test_config_inferred_from_weights(tmp_path):
    config = TINY.with_(depth=4, hidden_size=96, num_heads=4, patch_size=1, in_channels=16, learn_sigma=False,
                        max_caption_tokens=7, qk_norm=True, micro_conditions=True,
                        kv_compress=KVCompressConfig("conv", 3, (2, 3)))
    model = PixArtSigmaTransformer(config)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "m.pth")
    loaded = load_transformer(tmp_path / "m.pth", num_heads=4, sample_size=16, pe_interpolation=1.0)
    assert loaded.config == config


@pytest.mark.parametrize("name,sample_size,pe", [
    ("PixArt-Sigma-XL-2-512-MS.pth", 64, 1.0), ("PixArt-Sigma-XL-2-1024-MS.pth", 128, 2.0),
    ("PixArt-Sigma-XL-2-2K-MS.pth", 256, 4.0)])
def test_sizes_from_released_names(tmp_path, name, sample_size, pe):
    torch.save(PixArtSigmaTransformer(SIGMA_LIKE).state_dict(), tmp_path / name)
    config = load_transformer(tmp_path / name).config
    assert (config.sample_size, config.pe_interpolation, config.num_heads) == (sample_size, pe, 2)


def test_round_trips_are_bit_identical(tmp_path):
    model = randomized(SIGMA_LIKE)
    original = model.state_dict()
    save_official(model, tmp_path / "a.pth")
    convert(tmp_path / "a.pth", tmp_path / "b.safetensors", to="safetensors", sample_size=32, pe_interpolation=0.5)
    convert(tmp_path / "b.safetensors", tmp_path / "c_diffusers", to="diffusers")
    convert(tmp_path / "c_diffusers", tmp_path / "d.pth", to="official")
    convert(tmp_path / "d.pth", tmp_path / "e.safetensors", to="safetensors", sample_size=32, pe_interpolation=0.5)
    for path in ("a.pth", "b.safetensors", "c_diffusers", "d.pth", "e.safetensors"):
        loaded = load_transformer(tmp_path / path, sample_size=32, pe_interpolation=0.5)
        assert same_tensors(loaded.state_dict(), original), path
        assert loaded.config == SIGMA_LIKE, path
    # the diffusers config carries what the weights cannot tell
    cfg = json.loads((tmp_path / "c_diffusers" / "config.json").read_text())
    assert (cfg["interpolation_scale"], cfg["sample_size"], cfg["use_additional_conditions"]) == (0.5, 32, False)


def test_diffusers_export_loads_strictly_and_matches(tmp_path):
    from diffusers import PixArtTransformer2DModel

    model = randomized(SIGMA_LIKE)
    convert_src = save_safetensors(model, tmp_path / "m.safetensors")
    convert(convert_src, tmp_path / "diff", to="diffusers")
    ref = PixArtTransformer2DModel.from_pretrained(tmp_path / "diff", low_cpu_mem_usage=False).eval()
    expected = set(ref.state_dict())
    assert expected == set(official_to_diffusers(model.state_dict()))  # strict: no missing, no extra
    assert_matches_diffusers(model, ref, (12, 8), short_row=1, valid=9)


def assert_matches_diffusers(model, ref, latent_hw, short_row: int, valid: int) -> None:
    """Our model and diffusers' agree to 1e-5 on a batch of 2 whose row `short_row` has `valid` caption tokens."""
    x, t, y = torch.randn(2, 4, *latent_hw), torch.tensor([1.0, 998.0]), torch.randn(2, 20, 40)
    mask = torch.ones(2, 20)
    mask[short_row, valid:] = 0
    with torch.no_grad():
        assert (model(x, t, y, mask) - run_diffusers(ref, x, t, y, mask)).abs().max() <= 1e-5


def test_sharded_diffusers_folder_loads(tmp_path):
    from diffusers import PixArtTransformer2DModel

    model = randomized(SIGMA_LIKE)
    ref = diffusers_twin(model, tmp_path)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    loaded = load_transformer(tmp_path / "sharded")
    sd = {k: v for k, v in loaded.state_dict().items() if k != "y_embedder.y_embedding"}
    assert same_tensors(sd, {k: v for k, v in model.state_dict().items() if k != "y_embedder.y_embedding"})
    assert loaded.config.num_heads == 2 and loaded.config.pe_interpolation == 0.5


def test_diffusers_refuses_kv_compression_and_qk_norm(tmp_path):
    for config in (SIGMA_LIKE.with_(qk_norm=True), SIGMA_LIKE.with_(kv_compress=KVCompressConfig("conv", 2, (2,)))):
        save_safetensors(PixArtSigmaTransformer(config), tmp_path / "m.safetensors")
        with pytest.raises(PixsigmaError, match="cannot express KV compression or qk_norm"):
            convert(tmp_path / "m.safetensors", tmp_path / "out", to="diffusers")
        assert not (tmp_path / "out").exists()


def test_compressed_checkpoint_reloads_with_layers_and_ratio(tmp_path):
    for operator in ("conv", "ave", "uniform"):
        model = add_kv_compression(randomized(SIGMA_LIKE), layers=(1, 2), operator=operator, ratio=3)
        save_safetensors(model, tmp_path / f"{operator}.safetensors")
        loaded = load_transformer(tmp_path / f"{operator}.safetensors")
        assert loaded.config.kv_compress == KVCompressConfig(operator, 3, (1, 2))
        assert loaded.history[-1]["action"] == "kv-compress"
    # an official .pth tells the conv layers and R from the weights alone
    save_official(load_transformer(tmp_path / "conv.safetensors"), tmp_path / "conv.pth")
    assert load_transformer(tmp_path / "conv.pth").config.kv_compress == KVCompressConfig("conv", 3, (1, 2))


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    sd = PixArtSigmaTransformer(SIGMA_LIKE).state_dict()
    sd["blocks.1.mlp.fc2.weight"] = torch.zeros(144, 100)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(PixsigmaError, match=r"blocks\.1\.mlp\.fc2\.weight has shape \(144, 100\) but the model expects \(144, 576\)"):
        load_transformer(tmp_path / "bad.pth")


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/pixsigma_pwned",))


def test_code_executing_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": Exploit()}}, path, pickle_module=pickle)
    with pytest.raises(PixsigmaError, match="refused"):
        load_transformer(path)
    assert not os.path.exists("/tmp/pixsigma_pwned")


def test_truncated_and_foreign_files_name_the_file(tmp_path):
    save_safetensors(PixArtSigmaTransformer(SIGMA_LIKE), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    torch.save(PixArtSigmaTransformer(SIGMA_LIKE).state_dict(), tmp_path / "m.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "m.pth").read_bytes()[:5000])
    (tmp_path / "text.pth").write_text("hello")
    torch.save({"state_dict": {"foo.weight": torch.zeros(2)}}, tmp_path / "foreign.pth")
    for name in ("cut.safetensors", "cut.pth", "text.pth", "foreign.pth"):
        with pytest.raises(PixsigmaError, match=name):
            load_transformer(tmp_path / name)


def test_missing_folder_or_config_says_expected_layout(tmp_path):
    with pytest.raises(PixsigmaError, match="does not exist; expected"):
        load_transformer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PixsigmaError, match="no config.json; expected a diffusers transformer folder"):
        load_transformer(tmp_path / "empty")


def test_cli_convert_and_errors_without_traceback(tmp_path):
    save_official(randomized(SIGMA_LIKE), tmp_path / "m.pth")
    run = lambda *a: subprocess.run([sys.executable, "-m", "pixsigma.cli", *a], capture_output=True, text=True)
    ok = run("convert", str(tmp_path / "m.pth"), str(tmp_path / "m_diff"), "--to", "diffusers", "--sample-size", "32",
             "--pe-interpolation", "0.5")
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "m_diff" / "config.json").read_text())["interpolation_scale"] == 0.5
    bad = run("convert", str(tmp_path / "missing.pth"), str(tmp_path / "x"), "--to", "official")
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert "missing.pth" in bad.stderr


def test_folder_with_one_pixsigma_file_loads(tmp_path):
    model = add_kv_compression(randomized(SIGMA_LIKE), layers=(2,))
    save_safetensors(model, tmp_path / "pipe" / "transformer" / "model.safetensors")
    loaded = load_transformer(tmp_path / "pipe")  # the pipeline folder: transformer/ is found
    assert loaded.config == model.config
    assert same_tensors(loaded.state_dict(), model.state_dict())


def test_prediction_type_survives_every_layout_that_can_hold_it(tmp_path):
    v_like = SIGMA_LIKE.with_(prediction_type="v_prediction")
    model = randomized(v_like)
    save_safetensors(model, tmp_path / "v.safetensors")
    assert load_transformer(tmp_path / "v.safetensors").config == v_like
    convert(tmp_path / "v.safetensors", tmp_path / "v_diffusers", to="diffusers")
    assert load_transformer(tmp_path / "v_diffusers").config == v_like
    eps_cfg = json.loads((tmp_path / "v_diffusers" / "config.json").read_text())
    assert eps_cfg["pixsigma_prediction_type"] == "v_prediction"
    # an ε model's diffusers config stays exactly what diffusers writes
    convert(tmp_path / "v.safetensors", tmp_path / "e_diffusers", to="diffusers", prediction_type="epsilon")
    assert "pixsigma_prediction_type" not in json.loads((tmp_path / "e_diffusers" / "config.json").read_text())
    with pytest.raises(ValueError, match="prediction_type 'x0' is not supported"):
        SIGMA_LIKE.with_(prediction_type="x0")


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_diffusers_keyed_single_safetensors_loads(tmp_path):
    """A single file with diffusers' own key names (written from diffusers' state dict, no metadata)."""
    from safetensors.torch import save_file

    model = randomized(SIGMA_LIKE)
    ref = diffusers_twin(model, tmp_path)
    path = tmp_path / "pixart-256.safetensors"  # "256": sample size 32, pe_interpolation 0.5
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    loaded = load_transformer(path, max_caption_tokens=20)
    assert loaded.config == SIGMA_LIKE
    original = model.state_dict()
    for key, value in loaded.state_dict().items():
        if key != "y_embedder.y_embedding":
            assert torch.equal(value, original[key]), key
    # no null caption in diffusers' keys: a fresh one, seeded, N(0, 1/caption_channels)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(loaded.y_embedder.y_embedding, torch.randn(20, 40, generator=g) / 40**0.5)
    assert_matches_diffusers(loaded, ref, (8, 12), short_row=0, valid=11)


def test_missing_shard_of_a_sharded_diffusers_folder_is_named(tmp_path):
    model = randomized(SIGMA_LIKE)
    diffusers_twin(model, tmp_path).save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    index = json.loads((tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    (tmp_path / "sharded" / shards[1]).unlink()
    with pytest.raises(PixsigmaError) as excinfo:
        load_transformer(tmp_path / "sharded")
    message = one_line_error(excinfo)
    assert message == f"{tmp_path / 'sharded' / shards[1]}: shard named in diffusion_pytorch_model.safetensors.index.json is missing"


def test_wrong_class_name_in_config_json_is_refused(tmp_path):
    save_diffusers(randomized(SIGMA_LIKE), tmp_path / "t")
    config_path = tmp_path / "t" / "config.json"
    config = json.loads(config_path.read_text())
    for accepted in ("PixArtTransformer2DModel", "Transformer2DModel"):  # diffusers' current and older name
        config_path.write_text(json.dumps({**config, "_class_name": accepted}))
        assert load_transformer(tmp_path / "t").config == SIGMA_LIKE
    config_path.write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(PixsigmaError) as excinfo:
        load_transformer(tmp_path / "t")
    assert one_line_error(excinfo) == (
        f"{tmp_path / 't'}/config.json: _class_name is 'UNet2DConditionModel', expected PixArtTransformer2DModel")


def test_mlp_ratio_other_than_4_loads_but_is_refused_by_diffusers(tmp_path):
    config = SIGMA_LIKE.with_(mlp_ratio=2.0)
    model = randomized(config)
    save_official(model, tmp_path / "m.pth")
    loaded = load_transformer(tmp_path / "m.pth", sample_size=32, pe_interpolation=0.5)
    assert loaded.config == config and loaded.blocks[0].mlp.fc1.weight.shape == (288, 144)
    assert same_tensors(loaded.state_dict(), model.state_dict())
    with pytest.raises(PixsigmaError) as excinfo:
        convert(tmp_path / "m.pth", tmp_path / "out", to="diffusers", sample_size=32, pe_interpolation=0.5)
    assert one_line_error(excinfo) == "diffusers' PixArtTransformer2DModel has a fixed MLP ratio of 4; this model has 2.0"
    with pytest.raises(PixsigmaError, match="fixed MLP ratio of 4"):
        save_transformer(model, tmp_path / "out2", to="diffusers")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()
