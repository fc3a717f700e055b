"""`pixsigma train CONFIG --plan` and the memory estimate behind it, against measured bytes.

Measured on small configurations in one process: parameter and optimizer-state bytes from a
real model and optimizer after a step, activation bytes as the tensors autograd keeps for
backward (saved-tensor hooks), with and without activation checkpointing.
"""

import pytest
import torch
from came_pytorch import CAME

from pixsigma import cli
from pixsigma.model.transformer import PRESETS, PixArtSigmaTransformer
from pixsigma.train.distributed import memory_plan, world_from_env
from tests.test_train_distributed import _config
from tests.test_train_loop import synthetic_cache


def _measure(config, side: int, batch: int, optimizer: str, checkpointing: bool) -> dict:
    torch.manual_seed(0)
    model = PixArtSigmaTransformer(config.with_(sample_size=side)).train()
    model.set_runtime_options(gradient_checkpointing=checkpointing)
    opt = CAME(model.parameters(), lr=1e-4) if optimizer == "came" else torch.optim.AdamW(model.parameters(), lr=1e-4)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x, cap = torch.randn(batch, 4, side, side), torch.randn(batch, config.max_caption_tokens, config.caption_channels)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, torch.arange(batch) * 100, cap, force_drop_ids=torch.zeros(batch, dtype=torch.bool))
    out.square().mean().backward()
    opt.step()
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v) and k != "step")
    return {"params": sum(p.numel() * 4 for p in model.parameters()), "optimizer": state, "activations": sum(kept.values())}


@pytest.mark.parametrize("preset,side,optimizer", [("tiny", 32, "came"), ("small", 32, "adamw"), ("small", 64, "came")])
def test_memory_plan_matches_measured_bytes(preset, side, optimizer):
    config = PRESETS[preset]
    for ckpt in (False, True):
        plan = memory_plan(config.with_(sample_size=side), side * 8, 2, 1, "ddp", optimizer, "no", ckpt)
        got = _measure(config, side, 2, optimizer, ckpt)
        assert plan["params"] == got["params"] and plan["grads"] == got["params"]
        assert abs(plan["optimizer"] - got["optimizer"]) <= 0.01 * got["optimizer"]
        if ckpt:  # kept: each block's input and the rest; the estimate adds the one block recomputed in backward
            one_block = _measure(config, side, 2, optimizer, False)["activations"] / config.depth
            peak = got["activations"] + one_block
            assert abs(plan["activations"] - peak) <= 0.15 * peak, (plan, got)
        else:
            assert abs(plan["activations"] - got["activations"]) <= 0.1 * got["activations"], (plan, got)


def test_fsdp_divides_the_states_by_the_world_size():
    config = PRESETS["small"]
    one = memory_plan(config, 256, 2, 1, "fsdp", "came")
    four = memory_plan(config, 256, 2, 4, "fsdp", "came")
    ddp = memory_plan(config, 256, 2, 4, "ddp", "came")
    for k in ("params", "grads", "optimizer"):
        assert abs(four[k] * 4 - one[k]) <= 4 and ddp[k] == one[k]
    assert four["activations"] == ddp["activations"] == one["activations"]
    assert four["total"] < ddp["total"]


def test_plan_reads_the_world_from_the_environment(tmp_path, monkeypatch, capsys):
    cfg = _config(tmp_path / "c.toml", synthetic_cache(tmp_path / "cache"))
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cli.main(["train", str(cfg), "--plan", "--set", 'distributed.strategy="fsdp"']) == 0
    out = capsys.readouterr().out
    assert "world size 16 (this process: rank 5, local rank 1)" in out
    assert "1/16 of weights" in out and "2 per rank × 1 accumulation × 16 ranks = 32 per step" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("xl_2")]
    assert [(r[1], r[2]) for r in rows] == [(res, c) for res in ("1024", "2048", "4096") for c in ("no", "yes")]
    totals = [float(r[-1]) for r in rows]
    assert all(totals[i] > totals[i + 1] for i in (0, 2, 4))  # checkpointing saves memory
    assert totals[0] < totals[2] < totals[4]
    assert not (tmp_path / "run").exists()  # nothing trained
    assert world_from_env({}) == (1, 0, 0)
