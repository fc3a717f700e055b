"""What one training step does, checked against hand computations and independent runs: the EMA,
gradient accumulation, the loss scaler across a resume, `--max-steps`, `--resume` on an empty
folder, and the pruning of old checkpoints."""

import json
import logging
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pixsigma.data.cache import write_cache
from pixsigma.errors import PixsigmaError
from tests.test_train_loop import VAE, synthetic_cache, tiny_config


def _toml(path, cache, out, **sections) -> str:
    """A TOML config file for the tiny model on `cache` (sections: {name: {key: value}} overrides)."""
    d = {"model": {"preset": "tiny"}, "data": {"cache_dir": str(cache)},
         "optim": {"name": "adamw", "lr": 1e-3, "warmup_steps": 0, "ema_decay": 0.0},
         "schedule": {"max_steps": 6, "batch_size": 2, "log_every": 1, "deterministic": True},
         "checkpointing": {"every": 0, "export": "model"}, "output": {"dir": str(out), "tensorboard": False}}
    for k, v in sections.items():
        d[k] = {**d[k], **v}
    path.write_text("".join(f"[{k}]\n" + "".join(f"{kk} = {json.dumps(vv)}\n" for kk, vv in v.items()) for k, v in d.items()))
    return str(path)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ema_after_two_steps_matches_hand_computation_and_is_exported(tmp_path):
    """ema_decay 0.5: ema_k = 0.5·ema_{k-1} + 0.5·w_k from ema_0 = w_0, with w_1, w_2 read from the
    step checkpoints; the default export ("ema") writes exactly the EMA weights."""
    from pixsigma.model import TINY, PixArtSigmaTransformer, save_transformer
    from pixsigma.train.loop import train

    cache = synthetic_cache(tmp_path / "cache")
    torch.manual_seed(4)
    src = save_transformer(PixArtSigmaTransformer(TINY.with_(sample_size=8)), tmp_path / "w0.safetensors")
    cfg = tiny_config(tmp_path, cache, model={"init_from": str(src)}, optim={"ema_decay": 0.5, "warmup_steps": 0},
                      schedule={"max_steps": 2, "log_every": 1}, checkpointing={"every": 1, "keep": 5, "export": "ema"})
    out = train(cfg)
    w0 = load_file(src)
    w = [load_file(tmp_path / "run" / "checkpoints" / f"step-0000000{k}" / "model.safetensors") for k in (1, 2)]
    hand = {k: v.double() for k, v in w0.items()}
    for wk in w:
        hand = {k: 0.5 * hand[k] + 0.5 * wk[k].double() for k in hand}
    moved = [k for k in w0 if not torch.equal(w0[k], w[1][k])]
    assert len(moved) > len(w0) // 2  # the weights did train, so EMA, w_0 and w_2 all differ
    ema = load_file(tmp_path / "run" / "checkpoints" / "step-00000002" / "ema.safetensors")
    exported = load_file(out)
    assert _same(exported, ema)
    for k in w0:
        torch.testing.assert_close(exported[k].double(), hand[k], rtol=1e-6, atol=1e-7, msg=k)
    some = moved[0]
    assert not torch.allclose(exported[some], w[1][some], rtol=1e-6, atol=1e-7)  # the EMA is not the trained model
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["pixsigma_weights"] == "ema" and f.metadata()["pixsigma_step"] == "2"


def _fixed_draw_loss(model, diffusion, batch, vae, generator, rank, world, caption_dropout, device, *rest):
    """The training loss with each sample's timestep and noise drawn from a generator seeded by the
    sample itself, so that a sample's loss does not depend on which batch it lands in."""
    t, noise = [], []
    for mean in batch["mean"]:
        g = torch.Generator().manual_seed(int(mean.abs().sum().item() * 1e4))
        t.append(torch.randint(0, diffusion.num_timesteps, (1,), generator=g))
        noise.append(torch.randn(mean.shape, generator=g))
    kwargs = {"caption": batch["caption"], "caption_mask": batch["mask"]}
    return diffusion.training_loss(model, batch["mean"], torch.cat(t), torch.stack(noise), kwargs).loss.mean()


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, monkeypatch):
    """2 micro-batches of 2 give the gradient norm, loss and weights of one batch of 4 (same four
    samples per step: one aspect bin of four), to fp32 tolerance."""
    from pixsigma.train import loop

    monkeypatch.setattr(loop, "batch_loss", _fixed_draw_loss)
    g = torch.Generator().manual_seed(0)
    samples = [{"mean": torch.randn(4, 8, 8, generator=g), "std": torch.zeros(4, 8, 8),
                "short": torch.randn(3 + i, 32, generator=g)} for i in range(4)]
    cache = write_cache(tmp_path / "cache", samples, resolution=64, vae=VAE, max_length=16, shard_size=4)
    runs = {}
    for name, batch, accum in (("big", 4, 1), ("accum", 2, 2)):
        cfg = tiny_config(tmp_path, cache, optim={"grad_clip": 0.0, "warmup_steps": 0},
                          schedule={"max_steps": 3, "log_every": 1, "batch_size": batch, "grad_accum": accum},
                          output={"dir": str(tmp_path / name)})
        out = loop.train(cfg)
        runs[name] = (load_file(out), [json.loads(l) for l in open(tmp_path / name / "log.jsonl") if '"loss"' in l])
    (wa, la), (wb, lb) = runs["big"], runs["accum"]
    assert len(la) == len(lb) == 3
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([x[key] for x in lb]), torch.tensor([x[key] for x in la]), rtol=1e-5, atol=0)
    assert la[0]["samples_per_s"] > 0
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)


def test_loss_scaler_state_survives_a_resume(tmp_path, monkeypatch):
    """A GradScaler whose huge initial scale overflows the first steps (the CPU stand-in for fp16
    loss scaling, which accelerate enables on GPUs only): a run stopped at step 3 and
    resumed ends bit-identical to an uninterrupted 6-step run only because the checkpoint carries
    the scaler's state (a fresh scaler would skip the first resumed steps again)."""
    from pixsigma.train import loop

    make = loop._accelerator

    def with_scaler(cfg):
        acc = make(cfg)
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=1e20, growth_interval=1)
        return acc

    monkeypatch.setattr(loop, "_accelerator", with_scaler)
    cache = synthetic_cache(tmp_path / "cache")
    sections = dict(optim={"ema_decay": 0.9, "grad_clip": 0.0, "warmup_steps": 0}, checkpointing={"every": 3, "export": "model"})
    full = loop.train(tiny_config(tmp_path, cache, schedule={"max_steps": 6, "log_every": 1}, output={"dir": str(tmp_path / "full")},
                                  **sections))
    loop.train(tiny_config(tmp_path, cache, schedule={"max_steps": 3, "log_every": 1}, output={"dir": str(tmp_path / "cut")}, **sections))
    state_file = tmp_path / "cut" / "checkpoints" / "step-00000003" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["scaler"]["scale"] < 1e20  # steps were skipped and the scale backed off
    shutil.copytree(tmp_path / "cut", tmp_path / "no_scaler")
    (tmp_path / "no_scaler" / "checkpoints" / "step-00000003" / "state.json").write_text(json.dumps({**state, "scaler": None}))

    def resume(name):
        cfg = tiny_config(tmp_path, cache, schedule={"max_steps": 6, "log_every": 1}, output={"dir": str(tmp_path / name)}, **sections)
        return load_file(loop.train(cfg, resume=True))

    assert _same(resume("cut"), load_file(full))
    end = lambda d: json.loads((tmp_path / d / "checkpoints" / "step-00000006" / "state.json").read_text())["scaler"]  # noqa: E731
    assert end("cut") == end("full")
    assert not _same(resume("no_scaler"), load_file(full))  # the same resume without the saved scaler state differs


def test_cli_max_steps_and_resume_without_checkpoint(tmp_path, caplog):
    """--max-steps overrides schedule.max_steps; --resume on a folder with no checkpoint warns and
    trains from step 0, exactly like a run without --resume."""
    from pixsigma.cli import main

    cache = synthetic_cache(tmp_path / "cache")
    cfg = _toml(tmp_path / "c.toml", cache, tmp_path / "unused")
    assert main(["train", cfg, "--max-steps", "3", "--output", str(tmp_path / "a")]) == 0
    steps = [json.loads(l)["step"] for l in open(tmp_path / "a" / "log.jsonl") if '"loss"' in l]
    assert steps == [1, 2, 3]
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as f:
        assert f.metadata()["pixsigma_step"] == "3"
    with caplog.at_level(logging.WARNING, logger="pixsigma.train.loop"):
        assert main(["train", cfg, "--max-steps", "3", "--output", str(tmp_path / "b"), "--resume"]) == 0
    assert any("no checkpoint" in r.getMessage() and "starting from step 0" in r.getMessage() for r in caplog.records)
    assert _same(load_file(tmp_path / "b" / "model.safetensors"), load_file(tmp_path / "a" / "model.safetensors"))
    assert main(["train", cfg, "--max-steps", "0", "--output", str(tmp_path / "c")]) == 2  # bad input: one-line error


def test_old_checkpoints_are_pruned_to_keep(tmp_path):
    from pixsigma.train.checkpointing import latest_checkpoint
    from pixsigma.train.loop import train

    cache = synthetic_cache(tmp_path / "cache")
    train(tiny_config(tmp_path, cache, schedule={"max_steps": 5, "log_every": 5}, checkpointing={"every": 1, "keep": 2}))
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004", "step-00000005"]
    assert latest_checkpoint(tmp_path / "run") == root / "step-00000005"
    with pytest.raises(PixsigmaError, match="checkpointing.keep must be positive"):
        tiny_config(tmp_path, cache, checkpointing={"keep": 0})
