"""LoRA training through the one loop (pixsigma.train.task.LoraTask): only adapter weights train,
checkpoint, EMA and export hold only them, fp32 under bf16 autocast, a SIGKILLed run resumes
bit-identically, and two data-parallel processes match one."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pixsigma.io import weights_hash
from pixsigma.model import lora as L
from pixsigma.model.checkpoint import load_transformer, save_safetensors
from pixsigma.model.transformer import TINY
from pixsigma.train.config import config_from_dict
from pixsigma.train.loop import train
from tests.test_model import randomized
from tests.test_train_distributed import _config, assert_kill_then_resume_is_bit_identical, two_process_and_one_process_exports
from tests.test_train_loop import fine_tune_config, synthetic_cache


def lora_config(tmp_path, cache, base, **changes) -> dict:
    changes = {"optim.name": "came", "schedule.max_steps": 4, "checkpointing.every": 2, **changes}
    return fine_tune_config(tmp_path, cache, base, {"lora": {"rank": 4, "alpha": 4, "targets": ["attention+mlp"]}}, **changes)


@pytest.fixture(scope="module")
def base_and_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_train")
    model = randomized(TINY)
    return save_safetensors(model, root / "base.safetensors"), synthetic_cache(root / "cache"), weights_hash(model.state_dict())


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one global state per process; a run in another precision needs it reset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("optim,mixed", [("came", "no"), ("adamw", "bf16")])
def test_only_adapters_train_and_the_export_is_a_lora_file(tmp_path, base_and_cache, single_thread, fresh_accelerate, optim,
                                                            mixed):
    base, cache, base_hash = base_and_cache
    out = train(config_from_dict(lora_config(tmp_path, cache, base, **{"optim.name": optim, "precision.mixed": mixed})))
    assert out == tmp_path / "run" / "lora.safetensors"
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["base_model_hash"] == base_hash and meta["rank"] == "4" and json.loads(meta["targets"]) == ["attention+mlp"]
    exported = load_file(out)
    assert all(v.dtype == torch.float32 for v in exported.values())  # fp32 adapters, whatever the autocast
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in exported.items())  # B left zero: it trained
    ck = tmp_path / "run" / "checkpoints" / "step-00000004"
    model_file, ema_file = load_file(ck / "model.safetensors"), load_file(ck / "ema.safetensors")
    assert set(model_file) == set(ema_file) and all(L.is_adapter_param(k) for k in model_file)
    assert len(model_file) == 2 * 2 * 10  # A and B of 10 modules (attention + MLP) in each of 2 blocks
    assert any(not torch.equal(model_file[k], ema_file[k]) for k in model_file)  # EMA of the adapters, not a copy
    optimizer = json.loads((ck / "optimizer.json").read_text())
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == len(model_file)  # the optimizer holds only adapters
    # the exported LoRA on the untouched base is the trained model: base + adapters
    model = load_transformer(base)
    L.load_lora(model, out)
    assert L.lora_state(model).base_hash == base_hash


def lora_cli_config(tmp_path: Path, cache: Path, **extra) -> Path:
    """The distributed tests' config with a [lora] section, from a random base (the preset's init
    zeroes the output layer, which would leave attention adapters without gradient)."""
    base = save_safetensors(randomized(TINY), tmp_path / "base.safetensors")
    path = _config(tmp_path / "c.toml", cache, **extra)
    text = path.read_text().replace('preset = "tiny"', f'init_from = "{base}"')
    path.write_text(text + '[lora]\nrank = 4\ntargets = "attention"\n')
    return path


@pytest.mark.slow
def test_kill_after_a_checkpoint_then_resume_is_bit_identical(tmp_path):
    cfg = lora_cli_config(tmp_path, synthetic_cache(tmp_path / "cache"), steps=6, every=2)
    assert_kill_then_resume_is_bit_identical(tmp_path, ["train", cfg], "lora.safetensors", steps=6, kill_after=4)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    cfg = lora_cli_config(tmp_path, synthetic_cache(tmp_path / "cache"), optim="adamw")
    a, b = two_process_and_one_process_exports(tmp_path, ["train", cfg], "lora.safetensors")
    assert a.keys() == b.keys() and any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
