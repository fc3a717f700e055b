"""Latent consistency distillation (pixsigma.train.lcm): the loss against a hand computation of
the LCM target (teacher DDIM step with guidance, boundary scalings), the target network's EMA,
and runs through the one training loop: only the student trains, the teacher stays bit-identical,
the export is marked as an LCM model and a pipeline then samples it with "lcm" and no guidance."""

import contextlib
import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pixsigma.diffusion.gaussian import GaussianDiffusion
from pixsigma.errors import PixsigmaError
from pixsigma.model import lora as L
from pixsigma.model.checkpoint import load_transformer, save_safetensors
from pixsigma.model.transformer import TINY
from pixsigma.train.config import LcmSection, config_from_dict
from pixsigma.pipeline import is_lcm_lora
from pixsigma.train.lcm import TARGET_PREFIX, LcmTask, boundary_scalings, ddim_timesteps, lcm_task
from pixsigma.train.loop import train
from pixsigma.train.task import FullTask, LoraTask
from tests.test_model import randomized
from tests.test_train_loop import VAE, synthetic_cache

B, C, H, W, L_TOK = 3, 4, 8, 8, 16


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L_TOK, dtype=torch.long)
    mask[0, 5:] = 0
    return {"mean": torch.randn(B, C, H, W, generator=g), "std": torch.full((B, C, H, W), 0.05),
            "caption": torch.randn(B, L_TOK, 32, generator=g), "mask": mask}


def _run(student, prediction_type, seed=7):
    acc = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"), autocast=contextlib.nullcontext)
    return SimpleNamespace(acc=acc, generator=torch.Generator().manual_seed(seed), model=student, raw_model=student,
                           diffusion=GaussianDiffusion(prediction_type=prediction_type), source=SimpleNamespace(vae=VAE))


def _task(settings, teacher, student, target):
    task = LcmTask(settings, FullTask())
    task.teacher, task.student, task.target = teacher, student, target
    return task


def _hand_loss(teacher, student, target, batch, settings, prediction_type, seed, uncond=None):
    """The LCM loss written out: draws in the task's order, float64 schedule, v/ε conversions."""
    g = torch.Generator().manual_seed(seed)
    xi = torch.randn(B, C, H, W, generator=g)
    index = torch.randint(0, 50, (B,), generator=g)
    noise = torch.randn(B, C, H, W, generator=g)
    if settings.guidance_range:
        lo, hi = settings.guidance_range
        w = (lo + (hi - lo) * torch.rand(B, generator=g, dtype=torch.float64)).float()
    else:
        w = torch.full((B,), settings.guidance_scale)
    ac = torch.from_numpy(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000)))
    t = (index + 1) * 20 - 1
    t_prev = torch.clamp(t - 20, min=0)
    col = lambda v: v.float().reshape(-1, 1, 1, 1)  # noqa: E731
    x0 = batch["mean"] + batch["std"] * xi  # VAE scaling 1, shift 0
    x_t = col(ac[t].sqrt()) * x0 + col((1 - ac[t]).sqrt()) * noise

    def x0_eps(out, x, tt):
        a, s, p = col(ac[tt].sqrt()), col((1 - ac[tt]).sqrt()), out[:, :C].float()
        if prediction_type == "v_prediction":
            return a * x - s * p, s * x + a * p
        return (x - s * p) / a, p

    def f(out, x, tt):  # c_skip·x + c_out·x̂_0, σ_data = 0.5, timestep scaling 10
        st = tt.double() * 10.0
        c_skip, c_out = 0.25 / (st**2 + 0.25), st / torch.sqrt(st**2 + 0.25)
        return col(c_skip) * x + col(c_out) * x0_eps(out, x, tt)[0]

    cap, mask, no, yes = batch["caption"], batch["mask"], torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)
    with torch.no_grad():
        x0_c, eps_c = x0_eps(teacher(x_t, t, cap, mask, force_drop_ids=no), x_t, t)
        if uncond is None:
            out_u = teacher(x_t, t, cap, mask, force_drop_ids=yes)
        else:
            out_u = teacher(x_t, t, uncond[0].expand(B, -1, -1), uncond[1].expand(B, -1), force_drop_ids=no)
        x0_u, eps_u = x0_eps(out_u, x_t, t)
        x0_g, eps_g = x0_u + col(w) * (x0_c - x0_u), eps_u + col(w) * (eps_c - eps_u)
        x_prev = col(ac[t_prev].sqrt()) * x0_g + col((1 - ac[t_prev]).sqrt()) * eps_g
        tgt = f(target(x_prev, t_prev, cap, mask, force_drop_ids=no), x_prev, t_prev)
        pred = f(student(x_t, t, cap, mask, force_drop_ids=no), x_t, t)
    if settings.loss == "huber":
        return (torch.sqrt((pred - tgt) ** 2 + settings.huber_c**2) - settings.huber_c).mean()
    return ((pred - tgt) ** 2).mean()


def test_ddim_timesteps_and_boundary_scalings():
    t, t_prev = ddim_timesteps(1000, 50)
    assert t[:3].tolist() == [19, 39, 59] and t[-1] == 999 and t_prev[:3].tolist() == [0, 19, 39] and t_prev[-1] == 979
    c_skip, c_out = boundary_scalings(torch.tensor([0, 1, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0  # the boundary: f(x, 0) = x
    assert math.isclose(c_skip[1], 0.25 / (100 + 0.25), rel_tol=1e-6) and math.isclose(c_out[1], 10 / math.sqrt(100.25), rel_tol=1e-6)
    with pytest.raises(PixsigmaError, match="divide"):
        ddim_timesteps(1000, 30)


@pytest.mark.parametrize("prediction_type,settings,uncond", [
    ("v_prediction", LcmSection(), False),
    ("epsilon", LcmSection(guidance_range=[3.0, 15.0], loss="l2"), False),
    ("v_prediction", LcmSection(guidance_scale=2.0, unconditional="empty_prompt"), True),
])
def test_loss_matches_a_hand_computation(single_thread, prediction_type, settings, uncond):
    cfg = TINY.with_(prediction_type=prediction_type)
    teacher, student, target = randomized(cfg, 0), randomized(cfg, 1), randomized(cfg, 2)
    task = _task(settings, teacher, student, target)
    empty = None
    if uncond:  # an encoded empty prompt: its own embedding and a one-token mask
        empty = (torch.randn(1, L_TOK, 32, generator=torch.Generator().manual_seed(3)), torch.zeros(1, L_TOK, dtype=torch.long))
        empty[1][0, 0] = 1
        task.uncond = empty
    batch = _batch()
    got = task.loss(_run(student, prediction_type), batch, None)
    want = _hand_loss(teacher, student, target, batch, settings, prediction_type, 7, empty)
    torch.testing.assert_close(got, want.float(), rtol=2e-5, atol=1e-7)
    assert got > 0
    # the student itself as the target (target_decay = 0): the target pass runs the student, without gradient
    task.target = None
    got = task.loss(_run(student, prediction_type), batch, None)
    torch.testing.assert_close(got, _hand_loss(teacher, student, student, batch, settings, prediction_type, 7, empty).float(),
                               rtol=2e-5, atol=1e-7)


def test_target_network_follows_its_ema_and_is_checkpointed(tmp_path, single_thread):
    student = randomized(TINY, 1)
    task = _task(LcmSection(target_decay=0.95), randomized(TINY, 0), student, FullTask().make_ema(randomized(TINY, 2)))
    before = {n: p.clone() for n, p in task.target.named_parameters()}
    task.after_step(SimpleNamespace(raw_model=student))
    for n, p in task.target.named_parameters():
        torch.testing.assert_close(p, before[n] + 0.05 * (dict(student.named_parameters())[n] - before[n]), rtol=1e-6, atol=1e-7)
    # written with the trained module under lcm_target.*, and read back into the target
    path = task.save_weights(student, tmp_path / "model.safetensors", {})
    saved = load_file(path)
    assert {k for k in saved if k.startswith(TARGET_PREFIX)} == {TARGET_PREFIX + n for n, _ in student.named_parameters()}
    assert torch.equal(saved[TARGET_PREFIX + "final_layer.linear.weight"], task.target.final_layer.linear.weight)
    task.save_weights(copy.deepcopy(student), tmp_path / "ema.safetensors", {})
    assert not any(k.startswith(TARGET_PREFIX) for k in load_file(tmp_path / "ema.safetensors"))  # the loop's EMA: no target
    kept = {n: p.clone() for n, p in task.target.named_parameters()}
    with torch.no_grad():
        for p in task.target.parameters():
            p.zero_()
    task.load_weights(student, saved)
    assert all(torch.equal(p, kept[n]) for n, p in task.target.named_parameters())


def _config(tmp_path, cache, base, **sections) -> dict:
    d = {"model": {"init_from": str(base)}, "data": {"cache_dir": str(cache)},
         "optim": {"name": "adamw", "lr": 1e-3, "warmup_steps": 1, "ema_decay": 0.9},
         "schedule": {"max_steps": 4, "batch_size": 2, "log_every": 1, "deterministic": True},
         "checkpointing": {"every": 2, "keep": 2, "export": "model"}, "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
         "lcm": {}}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return d


@pytest.fixture(scope="module")
def base_and_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("lcm")
    base = save_safetensors(randomized(TINY.with_(prediction_type="v_prediction")), root / "base.safetensors")
    return base, synthetic_cache(root / "cache")


def _capture_task(monkeypatch):
    """The LcmTask the loop builds (to look at its teacher and target after the run)."""
    import pixsigma.train.loop as loop

    made = []
    monkeypatch.setattr(loop, "lcm_task", lambda cfg: made.append(lcm_task(cfg)) or made[-1])
    return made


def test_full_distillation_trains_only_the_student_and_marks_the_export(tmp_path, base_and_cache, single_thread, monkeypatch):
    base, cache = base_and_cache
    made = _capture_task(monkeypatch)
    out = train(config_from_dict(_config(tmp_path, cache, base)))
    task, before = made[0], load_file(base)
    assert isinstance(task, LcmTask) and out == tmp_path / "run" / "model.safetensors"
    assert all(torch.equal(task.teacher.state_dict()[k], v) for k, v in before.items())  # bit-identical teacher
    assert all(not p.requires_grad for p in task.teacher.parameters())
    exported = load_transformer(out)
    assert exported.history[-1]["action"] == "lcm-distill" and exported.history[-1]["guidance_scale"] == 4.5
    assert any(not torch.equal(exported.state_dict()[k], v) for k, v in before.items())  # the student trained
    ck = load_file(tmp_path / "run" / "checkpoints" / "step-00000004" / "model.safetensors")
    target = {k[len(TARGET_PREFIX):]: v for k, v in ck.items() if k.startswith(TARGET_PREFIX)}
    assert target and all(torch.equal(task.target.state_dict()[k], v) for k, v in target.items())
    # the target is an EMA (0.95) of the student: between the teacher and the student, not either
    k = "blocks.0.attn.qkv.weight"
    assert not torch.equal(target[k], ck[k]) and not torch.equal(target[k], before[k])


def test_lcm_lora_trains_only_adapters(tmp_path, base_and_cache, single_thread, monkeypatch):
    base, cache = base_and_cache
    made = _capture_task(monkeypatch)
    out = train(config_from_dict(_config(tmp_path, cache, base, lora={"rank": 4, "targets": ["attention"]},
                                         lcm={"target_decay": 0.0, "loss": "l2"})))
    task = made[0]
    assert isinstance(task.inner, LoraTask) and task.target is None and out.name == "lora.safetensors"
    assert all(torch.equal(task.teacher.state_dict()[k], v) for k, v in load_file(base).items())
    assert not any(L.is_adapter_param(n) for n, _ in task.teacher.named_parameters())  # the teacher has no adapters
    assert is_lcm_lora(out) and not is_lcm_lora(base)
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["pixsigma_lcm"])["loss"] == "l2"
    exported = load_file(out)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in exported.items())
    ck = load_file(tmp_path / "run" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert all(L.is_adapter_param(k) for k in ck)  # no target network kept (decay 0), only adapters


def test_config_checks():
    for bad in ({"loss": "l1"}, {"unconditional": "nothing"}, {"guidance_range": [5, 3]}, {"target_decay": 1.0}):
        with pytest.raises(PixsigmaError, match="lcm"):
            config_from_dict({"data": {"cache_dir": "x"}, "lcm": bad}).validate()
    cfg = config_from_dict({"data": {"cache_dir": "x"}, "model": {"preset": "tiny"}, "lcm": {}})
    with pytest.raises(PixsigmaError, match="teacher"):
        lcm_task(cfg).build(cfg, randomized(TINY))
