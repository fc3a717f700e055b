"""ControlNet training through the one loop (pixsigma.train.controlnet_task.ControlNetTask): only
the copies and projections train (the base stays bit-identical), checkpoints / EMA / optimizer
hold only them, the feature cache holds the control latent the VAE gives by hand (and the raw
source the same), conditioning dropout zeroes the control of the drawn samples, the export loads
with load_controlnet and steers the pipeline, and a SIGKILLed run resumes bit-identically."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pixsigma.errors import PixsigmaError
from pixsigma.io import weights_hash
from pixsigma.model.checkpoint import load_transformer, save_safetensors
from pixsigma.model.controlnet_checkpoint import load_controlnet
from pixsigma.model.transformer import TINY
from pixsigma.train.config import config_from_dict
from pixsigma.train.controlnet_task import ControlNetTask
from pixsigma.train.loop import train
from tests.test_model import randomized
from tests.test_train_distributed import _config, assert_kill_then_resume_is_bit_identical
from tests.test_train_loop import VAE, fine_tune_config

pytestmark = pytest.mark.usefixtures("single_thread")


def control_cache(path, n=8, seed=0):
    """Fixed random latents, captions and control latents (8×8, TINY's caption width)."""
    from pixsigma.data.cache import write_cache

    g = torch.Generator().manual_seed(seed)
    samples = [{"mean": torch.randn(4, 8, 8, generator=g) * 0.8, "std": torch.full((4, 8, 8), 0.02),
                "short": torch.randn(3 + i % 3, 32, generator=g), "long": None,
                "control": torch.randn(4, 8, 8, generator=g)} for i in range(n)]
    return write_cache(path, samples, resolution=64, vae=VAE, max_length=16, shard_size=4)


def cn_config(tmp_path, cache, base, **changes) -> dict:
    return fine_tune_config(tmp_path, cache, base, {"controlnet": {"num_blocks": 1, "conditioning_dropout": 0.0}}, **changes)


@pytest.fixture(scope="module")
def base_and_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn_train")
    model = randomized(TINY)
    return save_safetensors(model, root / "base.safetensors"), control_cache(root / "cache"), weights_hash(model.state_dict())


def test_only_copies_and_projections_train_and_the_export_is_a_controlnet_file(tmp_path, base_and_cache):
    base, cache, base_hash = base_and_cache
    out = train(config_from_dict(cn_config(tmp_path, cache, base)))
    assert out == tmp_path / "run" / "controlnet.safetensors"
    net = load_controlnet(out, base=base)  # checks the base's hash against the file's
    assert weights_hash(net.base_model.state_dict()) == base_hash  # the base did not move (bit-identical)
    fresh = load_transformer(base)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in net.base_model.state_dict().items())
    # the copies and both projections moved away from their start (copy of block 0, zeros)
    copy0 = {k: v for k, v in net.controlnet[0].copied_block.state_dict().items()}
    assert any(not torch.equal(v, fresh.blocks[0].state_dict()[k]) for k, v in copy0.items())
    assert net.controlnet[0].after_proj.weight.abs().max() > 0 and net.controlnet[0].before_proj.weight.abs().max() > 0
    ck = tmp_path / "run" / "checkpoints" / "step-00000002"
    model_file, ema_file = load_file(ck / "model.safetensors"), load_file(ck / "ema.safetensors")
    assert set(model_file) == set(ema_file) == {f"controlnet.{k}" for k in net.controlnet.state_dict()}
    assert any(not torch.equal(model_file[k], ema_file[k]) for k in model_file)  # EMA of the ControlNet, not a copy
    assert all(torch.equal(model_file[k], v) for k, v in net.controlnet_state_dict().items())  # export = trained weights
    optimizer = json.loads((ck / "optimizer.json").read_text())
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == len(model_file)


def test_ema_export_is_the_ema_of_the_controlnet(tmp_path, base_and_cache):
    """EMA by hand over the two checkpoints: ema_2 = lerp(lerp(w0, w1, 1-d), w2, 1-d), w0 the start."""
    base, cache, _ = base_and_cache
    out = train(config_from_dict(cn_config(tmp_path, cache, base, **{"checkpointing.export": "ema"})))
    start = ControlNetTask(1).build(config_from_dict(cn_config(tmp_path, cache, base)), load_transformer(base))
    w0 = start.controlnet_state_dict()
    w1 = load_file(tmp_path / "run" / "checkpoints" / "step-00000001" / "model.safetensors")
    w2 = load_file(tmp_path / "run" / "checkpoints" / "step-00000002" / "model.safetensors")
    exported = load_file(out)
    for k in w0:
        ema = torch.lerp(torch.lerp(w0[k], w1[k], 0.1), w2[k], 0.1)
        torch.testing.assert_close(exported[k], ema, rtol=1e-6, atol=1e-7)


def test_conditioning_dropout_zeroes_the_drawn_samples_control():
    """The control latent the model sees: scaled, and zero for the samples the run's generator drops."""
    from types import SimpleNamespace

    vae = {"factor": 8, "latent_channels": 4, "scaling_factor": 0.5, "shift_factor": 0.25}
    control = torch.randn(4, 4, 2, 2)
    batch = {"mean": torch.zeros(4, 4, 2, 2), "control": control}
    seen = {}

    def fake_batch_loss(*args, model_kwargs=None, **kw):
        seen.update(model_kwargs)
        return torch.zeros(())

    acc = SimpleNamespace(num_processes=1, process_index=0, device="cpu")
    run = SimpleNamespace(acc=acc, generator=torch.Generator().manual_seed(5), source=SimpleNamespace(vae=vae, controlled=4),
                          cfg=SimpleNamespace(schedule=SimpleNamespace(object_loss_weight=1.0, object_mask_margin=1)),
                          raw_model=SimpleNamespace(config=SimpleNamespace(caption_dropout=0.1)), model=None, diffusion=None)
    ControlNetTask(1, dropout=0.5).loss(run, batch, fake_batch_loss)
    keep = torch.rand(4, generator=torch.Generator().manual_seed(5)) >= 0.5
    assert 0 < keep.sum() < 4  # this seed drops some and keeps some
    expected = (control - 0.25) * 0.5 * keep.view(-1, 1, 1, 1)
    assert torch.equal(seen["control"], expected)
    run.source.controlled = 0
    with pytest.raises(PixsigmaError, match="no control images"):
        ControlNetTask(1).loss(run, {"mean": batch["mean"], "control": None}, fake_batch_loss)


def test_config_section_is_checked(tmp_path, base_and_cache):
    base, cache, _ = base_and_cache
    with pytest.raises(PixsigmaError, match="controlnet.condition"):
        config_from_dict(cn_config(tmp_path, cache, base, **{"controlnet.condition": "hed"}))
    with pytest.raises(PixsigmaError, match="conditioning_dropout"):
        config_from_dict(cn_config(tmp_path, cache, base, **{"controlnet.conditioning_dropout": 1.0}))
    with pytest.raises(PixsigmaError, match="num_blocks 2 is out of range"):
        train(config_from_dict(cn_config(tmp_path, cache, base, **{"controlnet.num_blocks": 2})))


# ---------------------------------------------------------------------------------------------
# Real images: the cache's control latent, the raw source, the export in the pipeline
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe_and_data(tmp_path_factory):
    tc = pytest.importorskip("tests.tiny_components")
    root = tmp_path_factory.mktemp("cn_data")
    pipe = tc.build_pipeline_folder(root / "pipe", vae_levels=2)  # VAE factor 2, 32px ↔ 16×16 latents
    data = root / "data"
    data.mkdir()
    recs = []
    for i in range(4):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
        edges = np.zeros((32, 32), np.uint8)
        edges[4 + i:20 + i, 8] = edges[8, 4:28] = 255
        Image.fromarray(edges).save(data / f"{i}.control.png")  # grayscale: read as RGB
        recs.append({"path": f"{i}.png", "height": 32, "width": 32, "prompt": f"a red cat {i}",
                     **({"control": f"{i}.control.png"} if i != 3 else {})})  # sample 3 has none
    (data / "data_info.json").write_text(json.dumps(recs))
    return pipe, data


def test_cache_holds_the_control_latent_the_vae_gives_by_hand(tmp_path, pipe_and_data):
    from diffusers import AutoencoderKL

    from pixsigma.data.cache import FeatureCache, RawSource, extract
    from pixsigma.data.datasets import CaptionDataset
    from pixsigma.text import load_text_encoder

    pipe, data = pipe_and_data
    extract(data, tmp_path / "c", pipe, pipe, 32, 16, shard_size=2, batch_size=2, rank=0, world_size=1, device="cpu")
    cache = FeatureCache(tmp_path / "c")
    assert cache.controlled == 3
    ae = AutoencoderKL.from_pretrained(pipe / "vae").eval()
    for i in range(3):
        gray = np.asarray(Image.open(data / f"{i}.control.png"), dtype=np.float64)
        rgb = torch.from_numpy(np.repeat(gray[..., None], 3, -1) / 127.5 - 1).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            want = ae.encode(rgb).latent_dist.mean[0]
        torch.testing.assert_close(cache.get(i)["control"], want, rtol=1e-5, atol=1e-5)
    assert cache.get(3)["control"] is None
    # the raw source (training without a cache) gives the same batch control, zeros where none
    dataset = CaptionDataset(data)
    raw = RawSource(dataset, load_text_encoder(pipe, 16), ae, 32, 4, 16, 0.0, 0, loss_masks=False, control_type="none")
    batch = raw.fetch([0, 3, 1], 0)
    torch.testing.assert_close(batch["control"][0], cache.get(0)["control"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch["control"][2], cache.get(1)["control"], rtol=1e-5, atol=1e-5)
    assert torch.equal(batch["control"][1], torch.zeros(4, 16, 16))
    # a preprocessor computes the control from the picture when the record names none
    canny = RawSource(dataset, load_text_encoder(pipe, 16), ae, 32, 4, 16, 0.0, 0, loss_masks=False, control_type="canny")
    assert canny.fetch([3], 0)["control"].abs().sum() > 0


def test_extract_cli_computes_canny_controls_from_the_pictures(tmp_path, pipe_and_data):
    """--control-type canny: every sample gets a control latent, the one without a control image
    from its picture: the VAE mean of the picture's Canny edges."""
    from diffusers import AutoencoderKL

    from pixsigma import cli
    from pixsigma.data.cache import FeatureCache
    from pixsigma.data.control import canny

    pipe, data = pipe_and_data
    assert cli.main(["extract", str(data), "--cache", str(tmp_path / "c"), "--vae", str(pipe), "--text-encoder", str(pipe),
                     "--resolution", "32", "--max-tokens", "16", "--device", "cpu", "--control-type", "canny"]) == 0
    cache = FeatureCache(tmp_path / "c")
    assert cache.controlled == 4
    edges = canny(np.asarray(Image.open(data / "3.png").convert("RGB")))
    ae = AutoencoderKL.from_pretrained(pipe / "vae").eval()
    with torch.no_grad():
        want = ae.encode(torch.from_numpy(edges / 127.5 - 1).permute(2, 0, 1)[None].float()).latent_dist.mean[0]
    torch.testing.assert_close(cache.get(3)["control"], want, rtol=1e-5, atol=1e-5)


def test_export_loads_and_steers_the_pipeline(tmp_path, pipe_and_data):
    from pixsigma import SigmaPipeline
    from pixsigma.data.cache import extract

    pipe, data = pipe_and_data
    extract(data, tmp_path / "c", pipe, pipe, 32, 16, shard_size=4, batch_size=4, rank=0, world_size=1, device="cpu")
    cfg = cn_config(tmp_path, tmp_path / "c", pipe / "transformer", **{"schedule.max_steps": 3, "optim.lr": 3e-2,
                                                                     "optim.ema_decay": 0.0, "checkpointing.every": 0})
    out = train(config_from_dict(cfg))
    p = SigmaPipeline.from_pretrained(pipe, controlnet=out)
    control = np.asarray(Image.open(data / "0.control.png"))
    kw = {"num_inference_steps": 3, "seed": 0}
    plain = np.asarray(p("a red cat", **kw).images[0], dtype=np.int16)
    steered = np.asarray(p("a red cat", control_image=control, **kw).images[0], dtype=np.int16)
    off = np.asarray(p("a red cat", control_image=control, controlnet_conditioning_scale=0.0, **kw).images[0], dtype=np.int16)
    assert np.array_equal(off, plain)  # scale 0 is the base
    assert np.abs(steered - plain).max() > 0  # the trained ControlNet changes the image


@pytest.mark.slow
def test_kill_after_a_checkpoint_then_resume_is_bit_identical(tmp_path):
    base = save_safetensors(randomized(TINY), tmp_path / "base.safetensors")
    cache = control_cache(tmp_path / "cache")
    cfg = _config(tmp_path / "c.toml", cache, steps=6, every=2)
    text = cfg.read_text().replace('preset = "tiny"', f'init_from = "{base}"')
    cfg.write_text(text + "[controlnet]\nnum_blocks = 1\nconditioning_dropout = 0.3\n")
    assert_kill_then_resume_is_bit_identical(tmp_path, ["train", cfg], "controlnet.safetensors", steps=6, kill_after=4)


def test_toy_writer_names_exact_control_maps(tmp_path):
    from pixsigma.data.control import mask_edges
    from pixsigma.data.datasets import CaptionDataset
    from pixsigma.toy.render import write_dataset

    info = json.loads(open(write_dataset(str(tmp_path / "e"), n=3, seed=2, size=32, control="edges")).read())
    for rec in info:
        mask = Image.open(tmp_path / "e" / rec["loss_mask"])
        edges = np.asarray(Image.open(tmp_path / "e" / rec["control"]).convert("RGB"))
        assert np.array_equal(edges, mask_edges(mask)) and edges.max() == 255
    assert all(s.control for s in CaptionDataset(tmp_path / "e"))
    info = json.loads(open(write_dataset(str(tmp_path / "m"), n=1, seed=2, size=32, control="mask")).read())
    assert np.array_equal(np.asarray(Image.open(tmp_path / "m" / info[0]["control"])),
                          np.asarray(Image.open(tmp_path / "m" / info[0]["loss_mask"])))
    with pytest.raises(PixsigmaError, match="control 'hed'"):
        write_dataset(str(tmp_path / "x"), n=1, control="hed")
