"""`pixsigma.data.cache.extract`, the typed library form of `pixsigma extract`, and the CLI's
--config path: what lands in the cache against the encoders run by hand."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pixsigma.errors import PixsigmaError

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def pipe_and_data(tmp_path_factory):
    tc = pytest.importorskip("tests.tiny_components")
    root = tmp_path_factory.mktemp("extract")
    pipe = tc.build_pipeline_folder(root / "pipe", vae_levels=3)  # VAE factor 4
    data = root / "data"
    data.mkdir()
    recs = []
    for i in range(3):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
        recs.append({"path": f"{i}.png", "height": 32, "width": 32, "ratio": 1.0, "prompt": f"a red cat {i}",
                     **({"sharegpt4v": "a photo of a red cat sitting on a wooden table"} if i == 1 else {})})
    (data / "data_info.json").write_text(json.dumps(recs))
    return pipe, data


def test_extract_stores_what_the_encoders_give_by_hand(tmp_path, pipe_and_data):
    """Each sample's cached VAE moments equal diffusers' AutoencoderKL posterior of the image in
    [-1, 1], and its caption tensors equal the T5 encoder's hidden states of its valid tokens."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, T5EncoderModel

    from pixsigma.data.cache import FeatureCache, extract

    pipe, data = pipe_and_data
    summary = extract(data, tmp_path / "c", pipe, pipe, 32, 16, shard_size=2, batch_size=2, rank=0, world_size=1, device="cpu")
    assert summary == {"shards_already_done": 0, "shards_written": 2, "samples": 3, "corrupt_images_skipped": 0}
    cache = FeatureCache(tmp_path / "c")
    meta = cache.meta
    assert meta["max_length"] == 16 and meta["multiple"] == 8 and meta["dtype"] == "float32"  # patch 2 × factor 4
    assert meta["vae_info"] == {"factor": 4, "latent_channels": 4, "scaling_factor": 0.13025, "shift_factor": 0.0}

    ae = AutoencoderKL.from_pretrained(pipe / "vae").eval()
    tok = AutoTokenizer.from_pretrained(pipe / "tokenizer")
    te = T5EncoderModel.from_pretrained(pipe / "text_encoder").eval()

    def states(text):
        ids = tok(text, max_length=16, truncation=True, return_tensors="pt").input_ids  # ends in </s>
        with torch.no_grad():
            return te(input_ids=ids).last_hidden_state[0]

    for i in range(3):
        image = torch.from_numpy(np.asarray(Image.open(data / f"{i}.png"), dtype=np.float64) / 127.5 - 1)
        with torch.no_grad():
            post = ae.encode(image.permute(2, 0, 1)[None].float()).latent_dist
        got = cache.get(i)
        torch.testing.assert_close(got["mean"], post.mean[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(got["std"], post.std[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(got["short"], states(f"a red cat {i}"), atol=1e-5, rtol=0)
        assert (got["long"] is None) == (i != 1)
    torch.testing.assert_close(cache.get(1)["long"], states("a photo of a red cat sitting on a wooden table"), atol=1e-5, rtol=0)


def test_extract_rank_from_environment_and_bad_rank(tmp_path, pipe_and_data, monkeypatch):
    from pixsigma.data.cache import extract

    pipe, data = pipe_and_data
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    extract(data, tmp_path / "c", pipe, pipe, 32, 16, shard_size=1, device="cpu")
    assert sorted(p.name for p in (tmp_path / "c").glob("shard-*")) == ["shard-00001.safetensors"]  # shard k → rank k mod 2
    with pytest.raises(PixsigmaError, match="rank 2 is outside 0..1"):
        extract(data, tmp_path / "d", pipe, pipe, 32, 16, rank=2, world_size=2, device="cpu")


def test_extract_cli_takes_unset_options_from_a_config(tmp_path, pipe_and_data):
    """With only --config, the data section gives dataset, encoders, resolution and cache folder,
    and the model preset its caption length (tiny: 16 tokens); a flag still wins over the config."""
    from pixsigma.cli import main
    from pixsigma.data.cache import FeatureCache

    pipe, data = pipe_and_data
    cfg = tmp_path / "train.toml"
    cfg.write_text(f'[model]\npreset = "tiny"\n[data]\npath = "{data}"\nresolution = 32\nvae = "{pipe}"\n'
                   f'text_encoder = "{pipe}"\ncache_dir = "{tmp_path / "c"}"\n')
    assert main(["extract", "--config", str(cfg), "--device", "cpu"]) == 0
    meta = FeatureCache(tmp_path / "c").meta
    assert meta["max_length"] == 16 and meta["resolution"] == 32 and meta["vae"] == str(pipe)
    assert main(["extract", "--config", str(cfg), "--cache", str(tmp_path / "d"), "--max-tokens", "12", "--device", "cpu"]) == 0
    assert FeatureCache(tmp_path / "d").meta["max_length"] == 12
    assert main(["extract", "--cache", str(tmp_path / "e"), "--vae", str(pipe), "--text-encoder", str(pipe), str(data)]) == 2  # no resolution
