"""Training loop: a tiny model learns, configs parse strictly, checkpoints and transitions load."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pixsigma.data.cache import write_cache
from pixsigma.errors import PixsigmaError
from pixsigma.train.config import STAGES, config_from_dict, load_config

VAE = {"factor": 8, "latent_channels": 4, "scaling_factor": 1.0, "shift_factor": 0.0}


def fine_tune_config(tmp_path, cache, base, section: dict, **changes) -> dict:
    """A short fine-tuning run of checkpoint `base` on `cache` with one extra config section
    (e.g. {"lora": {...}}); `changes` are dotted keys ("optim.name": "came")."""
    d = {"model": {"init_from": str(base)}, "data": {"cache_dir": str(cache)},
         "optim": {"name": "adamw", "lr": 1e-3, "warmup_steps": 1, "ema_decay": 0.9},
         "schedule": {"max_steps": 2, "batch_size": 2, "log_every": 1, "deterministic": True},
         "checkpointing": {"every": 1, "keep": 2, "export": "model"}, "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
         **section}
    for key, value in changes.items():
        group, _, name = key.partition(".")
        d.setdefault(group, {})[name] = value
    return d


def synthetic_cache(path, n=8, seed=0, caption_channels=32):
    """Fixed random latents (8×8, plus a few 8×16) and captions: something to memorize."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        hw = (8, 16) if i % 4 == 3 else (8, 8)
        samples.append({"mean": torch.randn(4, *hw, generator=g) * 0.8, "std": torch.full((4, *hw), 0.02),
                        "short": torch.randn(3 + i % 3, caption_channels, generator=g),
                        "long": torch.randn(7, caption_channels, generator=g) if i % 2 else None})
    return write_cache(path, samples, resolution=64, vae=VAE, max_length=16, shard_size=4)


def tiny_config(tmp_path, cache, **sections):
    d = {"model": {"preset": "tiny"}, "data": {"cache_dir": str(cache)},
         "optim": {"name": "adamw", "lr": 1e-3, "warmup_steps": 10, "grad_clip": 1.0, "ema_decay": 0.0},
         "schedule": {"max_steps": 20, "batch_size": 4, "log_every": 10},
         "checkpointing": {"every": 0, "export": "model"}, "output": {"dir": str(tmp_path / "run"), "tensorboard": False}}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return config_from_dict(d)


@torch.no_grad()
def eval_loss(model, cache_dir, n_batches=6, prediction_type="epsilon"):
    """Mean loss over fixed samples, timesteps and noise (lower-variance than the training log)."""
    from pixsigma.data.buckets import BucketBatchSampler
    from pixsigma.data.cache import CachedSource, FeatureCache
    from pixsigma.diffusion.gaussian import GaussianDiffusion
    from pixsigma.train.loop import batch_loss

    source = CachedSource(FeatureCache(cache_dir), model.config.max_caption_tokens, 0.6, 0)
    sampler = BucketBatchSampler(source.buckets(), 4, seed=0)
    g = torch.Generator().manual_seed(123)
    model.eval()
    losses = []
    for rep in range(n_batches):
        for _, pos in sampler.batches(rep):
            losses.append(batch_loss(model, GaussianDiffusion(prediction_type=prediction_type), source.fetch(pos, rep), source.vae, g, 0, 1, 0.0, "cpu").item())
    return float(np.mean(losses))


def test_tiny_model_learns(tmp_path):
    from pixsigma.model import PixArtSigmaTransformer, TINY, load_transformer
    from pixsigma.train.loop import train

    cache = synthetic_cache(tmp_path / "cache")
    cfg = tiny_config(tmp_path, cache, schedule={"max_steps": 200, "log_every": 50, "seed": 1})
    torch.manual_seed(1)
    before = eval_loss(PixArtSigmaTransformer(TINY.with_(sample_size=8)), cache)
    out = train(cfg)
    after = eval_loss(load_transformer(out), cache)
    print("eval loss before/after", before, after)
    assert after < 0.4 * before, (before, after)
    logged = [json.loads(l) for l in open(tmp_path / "run" / "log.jsonl")]
    assert {"loss", "lr", "grad_norm", "samples_per_s"} <= set(logged[0])


def test_cosine_lr_decay(tmp_path):
    from pixsigma.train.loop import lr_at, train

    cache = synthetic_cache(tmp_path / "cache")
    cfg = tiny_config(tmp_path, cache, optim={"warmup_steps": 4, "decay": "cosine", "min_lr": 1e-4},
                      schedule={"max_steps": 24, "log_every": 1})
    assert lr_at(cfg, 0) == pytest.approx(2.5e-4) and lr_at(cfg, 3) == pytest.approx(1e-3)  # warmup
    assert lr_at(cfg, 14) == pytest.approx(5.5e-4)  # halfway through the decay: mean of lr and min_lr
    assert lr_at(cfg, 24) == pytest.approx(1e-4)
    assert lr_at(tiny_config(tmp_path, cache), 20) == 1e-3  # "constant" stays the default
    train(cfg)
    logged = [json.loads(line)["lr"] for line in open(tmp_path / "run" / "log.jsonl") if '"lr"' in line]
    assert len(logged) == 24 and all(a > b for a, b in zip(logged[4:], logged[5:]))  # the optimizer got the decay
    assert logged[-1] == pytest.approx(lr_at(cfg, 23)) and logged[-1] < 1.1e-4
    with pytest.raises(PixsigmaError, match="optim.decay"):
        tiny_config(tmp_path, cache, optim={"decay": "linear"}).validate()
    with pytest.raises(PixsigmaError, match="optim.min_lr"):
        tiny_config(tmp_path, cache, optim={"decay": "cosine", "min_lr": 1.0}).validate()


def test_trainer_draws_logit_normal_timesteps_when_configured(tmp_path, monkeypatch):
    from pixsigma.diffusion.gaussian import GaussianDiffusion
    from pixsigma.train.loop import train

    seen = []
    original = GaussianDiffusion.training_loss

    def spy(self, model, x0, t, noise, kwargs, weight=None):
        seen.append(t.clone())
        return original(self, model, x0, t, noise, kwargs, weight)

    monkeypatch.setattr(GaussianDiffusion, "training_loss", spy)
    cache = synthetic_cache(tmp_path / "cache")
    cfg = tiny_config(tmp_path, cache, schedule={"max_steps": 6, "log_every": 3, "batch_size": 16,
                                                 "timestep_sampling": "logit_normal", "timestep_logit_std": 0.1})
    train(cfg)
    t = torch.cat(seen).float()
    assert len(seen) == 6 and 400 < t.min() and t.max() < 600  # sigmoid(0 ± 4·0.1) · 1000 ∈ (401, 599)
    with pytest.raises(PixsigmaError, match="schedule.timestep_sampling"):
        tiny_config(tmp_path, cache, schedule={"timestep_sampling": "beta"}).validate()


def test_object_loss_weight_needs_masks_and_rejects_bad_settings(tmp_path):
    from pixsigma.train.loop import train

    cache = synthetic_cache(tmp_path / "cache")  # no loss masks
    with pytest.raises(PixsigmaError, match="object_loss_weight = 4 needs object masks"):
        train(tiny_config(tmp_path, cache, schedule={"object_loss_weight": 4.0}))
    with pytest.raises(PixsigmaError, match="schedule.object_loss_weight must be >= 1"):
        tiny_config(tmp_path, cache, schedule={"object_loss_weight": 0.5}).validate()
    with pytest.raises(PixsigmaError, match="schedule.object_mask_margin"):
        tiny_config(tmp_path, cache, schedule={"object_mask_margin": -1}).validate()


def test_eps_model_fine_tuned_to_v_prediction_learns_and_exports_it(tmp_path):
    """init_from an ε checkpoint + overrides.prediction_type = v_prediction trains toward v: its v loss
    falls and ends far below that of the same run kept on ε (and the other way round for the ε
    loss); the exported file says v_prediction; a bad value or a structural override is one error."""
    from pixsigma.model import TINY, PixArtSigmaTransformer, load_transformer, save_transformer
    from pixsigma.train.loop import train

    cache = synthetic_cache(tmp_path / "cache")
    torch.manual_seed(2)
    src = save_transformer(PixArtSigmaTransformer(TINY.with_(sample_size=8)), tmp_path / "eps.safetensors")
    before_v = eval_loss(load_transformer(src), cache, prediction_type="v_prediction")
    runs = {}
    for kind in ("epsilon", "v_prediction"):
        cfg = tiny_config(tmp_path, cache, model={"init_from": str(src), "overrides": {"prediction_type": kind}},
                          schedule={"max_steps": 400, "log_every": 100, "seed": 1}, output={"dir": str(tmp_path / kind)})
        model = load_transformer(train(cfg))
        assert model.config.prediction_type == kind
        runs[kind] = {p: eval_loss(model, cache, prediction_type=p) for p in ("epsilon", "v_prediction")}
    print("v loss before", before_v, "after", runs)
    assert runs["v_prediction"]["v_prediction"] < 0.9 * before_v
    assert runs["v_prediction"]["v_prediction"] < 0.6 * runs["epsilon"]["v_prediction"]
    assert runs["epsilon"]["epsilon"] < 0.6 * runs["v_prediction"]["epsilon"]
    for overrides, match in (({"prediction_type": "x0"}, "prediction_type 'x0' is not supported"),
                             ({"depth": 3}, "cannot change a loaded checkpoint")):
        with pytest.raises(PixsigmaError, match=match):
            train(tiny_config(tmp_path, cache, model={"init_from": str(src), "overrides": overrides},
                              output={"dir": str(tmp_path / "bad")}))


def test_fine_tune_from_fp16_checkpoint_keeps_fp32_master_weights(tmp_path):
    """Released checkpoints are often stored in fp16: init_from one trains fp32 parameters and the
    loss falls (with the fp16 parameters kept, the loss went to NaN, and bf16 autocast crashed in
    the norms on a dtype clash; one process cannot switch accelerate's precision, so fp32 here)."""
    from pixsigma.model import TINY, PixArtSigmaTransformer, load_transformer, save_transformer
    from pixsigma.train.loop import train

    cache = synthetic_cache(tmp_path / "cache")
    torch.manual_seed(3)
    src = save_transformer(PixArtSigmaTransformer(TINY.with_(sample_size=8)).half(), tmp_path / "fp16.safetensors")
    assert load_transformer(src).x_embedder.proj.weight.dtype == torch.float16
    before = eval_loss(load_transformer(src, dtype=torch.float32), cache)
    out = train(tiny_config(tmp_path, cache, model={"init_from": str(src)},
                            schedule={"max_steps": 60, "log_every": 20, "seed": 1}))
    after = eval_loss(load_transformer(out, dtype=torch.float32), cache)
    assert after < 0.9 * before


def test_config_unknown_key_and_set(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('stage = "aesthetics-512"\n[data]\npath = "x"\n[optim]\nweight_decy = 0\n')
    with pytest.raises(PixsigmaError, match=r"'optim.weight_decy'.*did you mean 'weight_decay'"):
        load_config(cfg_file)
    cfg_file.write_text('stage = "aesthetics-512"\n[data]\npath = "x"\n[optim]\nlr = 1e-4\n')
    cfg = load_config(cfg_file, ["schedule.snr_gamma=5", "optim.betas=[0.9, 0.99]", "model.gradient_checkpointing=true",
                                 "output.dir=/tmp/somewhere", "model.overrides.depth=4"])
    assert cfg.optim.lr == 1e-4  # the file wins over the stage preset
    assert cfg.data.resolution == 512 and cfg.schedule.max_steps == STAGES["aesthetics-512"]["max_steps"]
    assert cfg.schedule.snr_gamma == 5.0 and isinstance(cfg.schedule.snr_gamma, float)
    assert cfg.optim.betas == [0.9, 0.99] and cfg.model.gradient_checkpointing is True
    assert cfg.output.dir == "/tmp/somewhere" and cfg.model.overrides == {"depth": 4}
    with pytest.raises(PixsigmaError, match="'schedule.max_step'.*'max_steps'"):
        load_config(cfg_file, ["schedule.max_step=3"])
    with pytest.raises(PixsigmaError, match="model.overrides.dept.*'depth'"):
        load_config(cfg_file, ["model.overrides.dept=3"])
    with pytest.raises(PixsigmaError, match="must be an integer"):
        load_config(cfg_file, ["schedule.batch_size=abc"])
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("data:\n  cache_dir: c\noptim:\n  name: adamw\n")
    assert load_config(yaml_file).optim.name == "adamw"


def test_example_configs_parse():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parent.parent / "configs").rglob("*.toml"))  # configs/toy/ too
    assert len(files) >= len(STAGES)
    for f in files:
        load_config(f)


def test_cli_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nnmae = 'came'\n")
    r = subprocess.run([sys.executable, "-m", "pixsigma.cli", "train", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "did you mean 'name'" in r.stderr


def test_optimizer_state_roundtrip_without_pickle():
    from came_pytorch import CAME

    from pixsigma.train.checkpointing import optimizer_from_files, optimizer_to_files

    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = CAME([p], lr=1e-3)
    p.grad = torch.randn(4, 3)
    opt.step()
    tensors, structure = optimizer_to_files(opt.state_dict())
    structure = json.loads(json.dumps(structure))
    opt2 = CAME([torch.nn.Parameter(p.detach().clone())], lr=1e-3)
    opt2.load_state_dict(optimizer_from_files(tensors, structure, like=opt2.state_dict()))
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k, v in s1["state"][0].items():
        assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][0][k]))


def test_adapt_transitions_load_and_train(tmp_path):
    from pixsigma.model import PixArtSigmaTransformer, TINY, load_transformer, save_transformer
    from pixsigma.train import adapt
    from pixsigma.train.loop import train

    src = save_transformer(PixArtSigmaTransformer(TINY.with_(sample_size=8)), tmp_path / "base.safetensors")
    vae_dir = tmp_path / "vae"
    vae_dir.mkdir()
    (vae_dir / "config.json").write_text(json.dumps({"latent_channels": 4, "block_out_channels": [8, 8, 8, 8], "scaling_factor": 0.5}))
    cache = synthetic_cache(tmp_path / "cache")
    a = adapt.adapt_vae(src, tmp_path / "a.safetensors", vae_dir, caches=[cache])
    assert (cache / "STALE").is_file()
    assert load_transformer(a).history[-1]["scaling_factor"] == 0.5
    b = adapt.adapt_resolution(a, tmp_path / "b.safetensors", 128)
    mb = load_transformer(b)
    assert mb.config.sample_size == 16 and mb.config.pe_interpolation == 2.0 and mb.history[-1]["resolution"] == 128
    c = adapt.adapt_kv_compress(b, tmp_path / "c.safetensors")
    mc = load_transformer(c)
    assert mc.config.kv_compress.layers == (1,) and mc.config.kv_compress.operator == "conv"
    d = adapt.adapt_tokens(c, tmp_path / "d.safetensors", 24)
    md = load_transformer(d)
    assert md.config.max_caption_tokens == 24 and [h["action"] for h in md.history] == ["vae", "resolution", "kv-compress", "tokens"]

    (cache / "STALE").unlink()
    cfg = tiny_config(tmp_path, cache, model={"init_from": str(d)}, schedule={"max_steps": 2, "log_every": 1})
    out = train(cfg)
    trained = load_transformer(out)
    assert trained.config.kv_compress.layers == (1,) and len(trained.history) == 4
    with pytest.raises(PixsigmaError, match="stale"):
        adapt.mark_stale(cache, "VAE changed")
        train(tiny_config(tmp_path, cache, output={"dir": str(tmp_path / "run2")}))
