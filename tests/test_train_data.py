"""Training data: layouts and skipping, aspect buckets, the bucket sampler, the feature cache."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from pixsigma.data.buckets import BucketBatchSampler, aspect_bins, assign_bins
from pixsigma.data.datasets import CaptionDataset, use_long_caption
from pixsigma.errors import PixsigmaError


def _png(path, h, w, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------


def test_layouts_and_skips(tmp_path):
    img = tmp_path / "imgs"
    img.mkdir()
    for i, (h, w) in enumerate([(32, 32), (32, 64), (16, 80), (32, 32)]):
        _png(img / f"{i}.png", h, w, i)
    recs = [
        {"path": "imgs/0.png", "height": 32, "width": 32, "ratio": 1.0, "prompt": "a", "sharegpt4v": "a long one"},
        {"path": "imgs/1.png", "height": 32, "width": 64, "ratio": 0.5, "prompt": "b"},
        {"path": "imgs/2.png", "height": 16, "width": 80, "ratio": 0.2, "prompt": "too wide"},
        {"path": "imgs/missing.png", "height": 32, "width": 32, "ratio": 1.0, "prompt": "gone"},
        {"path": "imgs/3.png", "height": 32, "width": 32, "ratio": 1.0, "prompt": "  "},
    ]
    (tmp_path / "data_info.json").write_text(json.dumps(recs))
    ds = CaptionDataset(tmp_path)
    assert ds.layout == "data_info" and len(ds) == 2
    assert ds[0].long_prompt == "a long one" and ds[1].long_prompt is None
    assert sum(ds.skipped.values()) == 3

    lines = [json.dumps({"path": "imgs/0.png", "prompt": "x", "long_prompt": "y"}), "{not json", "",
             json.dumps({"path": "imgs/3.png", "prompt": "z"})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    ds = CaptionDataset(tmp_path / "m.jsonl")
    assert len(ds) == 2 and ds.skipped["unreadable JSON line"] == 1 and ds[0].long_prompt == "y"

    (img / "0.txt").write_text("cap zero")
    (img / "1.txt").write_text("cap one")
    (img / "2.txt").write_text("cap two")  # 16x80: ratio 5 > 4, skipped
    ds = CaptionDataset(img)
    assert ds.layout == "folder" and [s.prompt for s in ds] == ["cap zero", "cap one"]

    with pytest.raises(PixsigmaError, match="does not exist"):
        CaptionDataset(tmp_path / "nope")


def test_folder_layout_pairs_object_masks_and_does_not_take_them_for_images(tmp_path):
    for name in ("a", "b"):
        _png(tmp_path / f"{name}.png", 16, 16)
        (tmp_path / f"{name}.txt").write_text(f"a {name}")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "a.mask.png")
    ds = CaptionDataset(tmp_path)
    assert [s.prompt for s in ds.samples] == ["a a", "a b"]
    assert ds[0].loss_mask == str((tmp_path / "a.mask.png").resolve()) and ds[1].loss_mask is None


def test_long_caption_choice_is_deterministic():
    picks = [use_long_caption(3, 0, i, 0.6) for i in range(2000)]
    assert picks == [use_long_caption(3, 0, i, 0.6) for i in range(2000)]
    assert 0.55 < np.mean(picks) < 0.65
    assert picks != [use_long_caption(3, 1, i, 0.6) for i in range(2000)]


# ---------------------------------------------------------------------------------------------
# buckets
# ---------------------------------------------------------------------------------------------


def test_bins():
    b256 = aspect_bins(256)
    assert b256["1.0"] == (256, 256) and len(b256) == 40
    b32 = aspect_bins(32, 16)  # toy stage: the 256 table scaled by 1/8, sides multiples of 16
    assert b32["1.0"] == (32, 32)
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in b32.values())
    assert assign_bins([(64, 64), (30, 120)], 64, 16) == [(64, 64), (32, 128)]


def test_bucket_sampler_one_bin_every_sample_two_ranks():
    rng = np.random.default_rng(0)
    buckets = [tuple(x) for x in rng.choice([(8, 8), (8, 16), (16, 8)], size=37)]
    per_rank = 3
    single = BucketBatchSampler(buckets, per_rank * 2, seed=5)
    ranks = [BucketBatchSampler(buckets, per_rank, seed=5, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        b0 = list(ranks[0].batches(epoch))
        b1 = list(ranks[1].batches(epoch))
        ref = list(single.batches(epoch))
        assert len(b0) == len(b1) == len(ref) == len(single)
        seen = Counter()
        for (i0, x0), (i1, x1), (_, g) in zip(b0, b1, ref):
            assert i0 == i1 and x0 + x1 == g  # each rank holds its slice of the same global batch
            assert len(x0) == len(x1) == per_rank
            assert len({buckets[i] for i in g}) == 1  # one bin per global batch
            seen.update(g)
        assert set(seen) == set(range(len(buckets)))  # every sample at least once
        pads = sum(seen.values()) - len(buckets)
        assert pads < len(set(buckets)) * per_rank * 2  # duplicates only fill a bin's last batch
    assert [x for _, x in ranks[0].batches(0)] != [x for _, x in ranks[0].batches(1)]
    assert list(ranks[0].batches(1, start=2)) == list(ranks[0].batches(1))[2:]
    even = BucketBatchSampler([(8, 8)] * 8 + [(4, 8)] * 4, 4, seed=1)
    assert sorted(i for _, b in even.batches(0) for i in b) == list(range(12))  # exactly once


# ---------------------------------------------------------------------------------------------
# feature cache == raw data
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    tc = pytest.importorskip("tests.tiny_components")
    from pixsigma.text import TextEncoder

    root = tmp_path_factory.mktemp("enc")
    tok, tok_dir = tc.build_tokenizer(root / "spm")
    te = tc.build_text_encoder(len(tok))
    te.save_pretrained(root / "te")
    text = TextEncoder(root / "te", tok_dir, max_length=16)
    vae = tc.build_vae(levels=3, channels=32, groups=32)  # factor 4: 32px images → 8×8 latents
    return text, vae


def _toy_dataset(folder, n=6):
    folder.mkdir()
    recs = []
    for i in range(n):
        h, w = (32, 32) if i % 3 else (32, 64)
        _png(folder / f"{i}.png", h, w, i)
        recs.append({"path": f"{i}.png", "height": h, "width": w, "ratio": h / w, "prompt": f"a red cat {i}",
                     "sharegpt4v": f"a photo of a red cat sitting on a wooden table number {i}"})
        if i != 1:  # object masks (a box whose place depends on i) on all but one sample
            m = np.zeros((h, w), np.uint8)
            m[4 + i: 20 + i, 2 * i: 2 * i + 12] = 255
            Image.fromarray(m).save(folder / f"{i}.mask.png")
            recs[-1]["loss_mask"] = f"{i}.mask.png"
    return recs


def test_cache_matches_raw_training(tmp_path, encoders):
    from pixsigma.data.cache import FeatureCache, extract_features
    from pixsigma.train.config import config_from_dict
    from pixsigma.train.loop import train

    text, vae = encoders
    data = tmp_path / "data"
    recs = _toy_dataset(data)
    (data / "broken.png").write_bytes(b"not a png at all")
    recs.append({"path": "broken.png", "height": 32, "width": 32, "ratio": 1.0, "prompt": "broken"})
    (data / "data_info.json").write_text(json.dumps(recs))
    ds = CaptionDataset(data)
    assert len(ds) == 7
    summary = extract_features(ds, tmp_path / "cache", text, vae, resolution=32, max_length=16, multiple=8, shard_size=3, batch_size=2)
    assert summary["corrupt_images_skipped"] == 1 and summary["samples"] == 6 and summary["shards_written"] == 3
    again = extract_features(ds, tmp_path / "cache", text, vae, resolution=32, max_length=16, multiple=8, shard_size=3)
    assert again.get("shards_written", 0) == 0 and again["shards_already_done"] == 3  # resumable
    cache = FeatureCache(tmp_path / "cache")
    assert len(cache.index) == 6 and cache.shape[0] == (6, 12)  # 32x64 → bin 24x48 px (256 table / 8, multiples of 8)
    # object masks: cropped like their image, averaged over each 4×4 latent cell; sample 1 has none
    assert cache.masked == 5 and cache.get(1)["loss_mask"] is None
    m2 = cache.get(2)["loss_mask"]
    # sample 2's box: pixel rows 6..21 and columns 4..15 → latent rows 2..4 full, 1 and 5 half, columns 1..3
    assert m2.shape == (1, 8, 8) and m2.sum() * 16 == pytest.approx(16 * 12) and m2[0, 2:5, 1:4].min() == 1
    assert m2[0, 1, 1] == pytest.approx(0.5) and m2[0, 5, 3] == pytest.approx(0.5) and m2[0, 0].sum() == 0
    m0 = cache.get(0)["loss_mask"]  # 32x64 → cover-resized to 24x48 and cropped: the box shrinks by 3/4
    assert m0.shape == (1, 6, 12) and m0.sum() * 16 == pytest.approx(16 * 12 * 0.75 ** 2, rel=0.1)

    (data / "broken.png").unlink()  # the raw run sees the same 6 samples
    recs.pop()
    (data / "data_info.json").write_text(json.dumps(recs))
    base = {"model": {"preset": "tiny", "overrides": {"caption_channels": 32, "max_caption_tokens": 16}},
            "data": {"path": str(data), "resolution": 32},
            "optim": {"name": "adamw", "lr": 1e-3, "warmup_steps": 0, "ema_decay": 0.0},
            "schedule": {"max_steps": 3, "batch_size": 2, "log_every": 1, "deterministic": True, "object_loss_weight": 4.0},
            "checkpointing": {"every": 0, "export": "model"}, "output": {"tensorboard": False}}
    raw_cfg = config_from_dict(base, [f"output.dir='{tmp_path / 'raw'}'", "validation.every=3", "validation.steps=2",
                                      "validation.prompts=['a red cat']", "validation.seeds=[0]"])
    cache_cfg = config_from_dict(base, [f"output.dir='{tmp_path / 'cached'}'", f"data.cache_dir='{tmp_path / 'cache'}'"])
    train(raw_cfg, text_encoder=text, vae=vae)
    train(cache_cfg)
    read = lambda d: [json.loads(l)["loss"] for l in open(d / "log.jsonl") if '"loss"' in l]
    raw_losses, cached_losses = read(tmp_path / "raw"), read(tmp_path / "cached")
    assert len(raw_losses) == 3
    np.testing.assert_allclose(cached_losses, raw_losses, rtol=1e-5)  # the same masks reached both losses
    plain_cfg = config_from_dict(base, [f"output.dir='{tmp_path / 'plain'}'", f"data.cache_dir='{tmp_path / 'cache'}'",
                                        "schedule.object_loss_weight=1.0"])
    train(plain_cfg)
    assert not np.allclose(read(tmp_path / "plain"), cached_losses, rtol=1e-3)  # and they changed the loss
    grid = tmp_path / "raw" / "validation" / "step-00000003.png"
    assert grid.is_file() and Image.open(grid).size == (32, 32)  # sampled through SigmaPipeline


def test_stale_cache_refused(tmp_path):
    from pixsigma.data.cache import FeatureCache, write_cache
    from pixsigma.train.adapt import mark_stale

    vae = {"factor": 8, "latent_channels": 4, "scaling_factor": 1.0, "shift_factor": 0.0}
    write_cache(tmp_path / "c", [{"mean": torch.zeros(4, 2, 2), "std": torch.ones(4, 2, 2), "short": torch.zeros(2, 8)}], 16, vae, 8)
    FeatureCache(tmp_path / "c")
    mark_stale(tmp_path / "c", "VAE changed to /new/vae")
    with pytest.raises(PixsigmaError, match="stale.*new/vae"):
        FeatureCache(tmp_path / "c")


def test_extract_cli_split_over_ranks(tmp_path):
    tc = pytest.importorskip("tests.tiny_components")
    from pixsigma.cli import main
    from pixsigma.data.cache import FeatureCache

    pipe = tc.build_pipeline_folder(tmp_path / "pipe", vae_levels=3)
    data = tmp_path / "data"
    (data / "data_info.json").parent.mkdir()
    recs = []
    for i in range(5):
        _png(data / f"{i}.png", 32, 32, i)
        recs.append({"path": f"{i}.png", "height": 32, "width": 32, "ratio": 1.0, "prompt": f"a cat {i}"})
    (data / "data_info.json").write_text(json.dumps(recs))
    args = ["extract", str(data), "--cache", str(tmp_path / "c"), "--vae", str(pipe), "--text-encoder", str(pipe),
            "--resolution", "32", "--max-tokens", "16", "--shard-size", "2", "--world-size", "2"]
    assert main(args + ["--rank", "0"]) == 0
    assert sorted(p.name for p in (tmp_path / "c").glob("shard-*")) == ["shard-00000.safetensors", "shard-00002.safetensors"]
    with pytest.raises(PixsigmaError, match="incomplete"):
        FeatureCache(tmp_path / "c")
    assert main(args + ["--rank", "1"]) == 0
    assert len(FeatureCache(tmp_path / "c").index) == 5
    assert main(["extract", str(tmp_path / "missing"), "--cache", "x", "--vae", "v", "--text-encoder", "t", "--resolution", "32"]) == 2
