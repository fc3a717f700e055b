"""LoRA on the one transformer: parity with diffusers' PixArtTransformer2DModel wrapped by peft
(files we write read there, files peft writes read here), the other file layouts, fuse/unfuse,
scales, several adapters, and the errors."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pixsigma.errors import PixsigmaError
from pixsigma.model import lora as L
from pixsigma.model.transformer import TINY
from tests.test_model import diffusers_twin, randomized, run_diffusers

# The official PixArt-Σ LoRA script's target_modules (diffusers' names, matched as suffixes).
OFFICIAL_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "proj", "linear",
                    "linear_1", "linear_2"]


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    mask = torch.ones(2, 16)
    mask[1, 9:] = 0
    return x, torch.tensor([3.0, 700.0]), y, mask


def out(model, seed=1):
    with torch.no_grad():
        return model(*inputs(seed))


def randomize_adapters(model, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in L.adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def with_lora(spec=L.LoraSpec(rank=4, alpha=6, targets=("all",)), seed=0):
    model = randomized(TINY)
    L.add_lora(model, spec)
    randomize_adapters(model, seed)
    return model


def test_our_file_in_diffusers_with_peft_matches(tmp_path):
    """Our file, read by diffusers + peft as ComfyUI-style users do: same outputs to 1e-5; "all"
    selects exactly the official script's target modules."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    model = randomized(TINY)
    ref = diffusers_twin(model, tmp_path)
    L.add_lora(model, L.LoraSpec(rank=4, alpha=6, targets=("all",)))
    randomize_adapters(model)
    L.save_lora(model, tmp_path / "a.safetensors")
    sd = load_file(tmp_path / "a.safetensors")
    assert all(k.startswith("transformer.") for k in sd) and "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight" in sd
    assert sd["transformer.transformer_blocks.1.attn2.to_v.alpha"].item() == 6.0
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=6, target_modules=OFFICIAL_TARGETS), ref)
    result = set_peft_model_state_dict(ref, {k.removeprefix("transformer."): v for k, v in sd.items() if not k.endswith(".alpha")})
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    ours, theirs = out(model), run_diffusers(ref, *inputs())
    assert (ours - theirs).abs().max() <= 1e-5
    assert (ours - out(randomized(TINY))).abs().max() > 1e-2  # the adapters do change the output
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["rank"], meta["alpha"], json.loads(meta["targets"])) == ("4", "6.0", ["all"])
    from pixsigma.io import weights_hash

    assert meta["base_model_hash"] == weights_hash(randomized(TINY).state_dict())


@pytest.fixture(scope="module")
def peft_files(tmp_path_factory):
    """diffusers + peft as the official script sets it up (rank 4, peft's default alpha 8, the
    official targets, random non-zero B), saved as a PEFT folder and as the script's
    transformer_lora/pytorch_lora_weights.safetensors; and its output."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    tmp = tmp_path_factory.mktemp("peft")
    ref = diffusers_twin(randomized(TINY), tmp)
    peft_model = get_peft_model(ref, LoraConfig(r=4, init_lora_weights="gaussian", target_modules=OFFICIAL_TARGETS))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(tmp / "peft_folder")
    state = get_peft_model_state_dict(peft_model)
    (tmp / "official" / "transformer_lora").mkdir(parents=True)
    save_file({f"unet.{k}": v.contiguous() for k, v in state.items()}, tmp / "official" / "transformer_lora" / L.OFFICIAL_WEIGHTS)
    return tmp, run_diffusers(peft_model.base_model.model, *inputs())


@pytest.mark.parametrize("layout", ["peft_folder", "official"])
def test_peft_written_files_load_here(peft_files, layout):
    tmp, expected = peft_files
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp / "peft_folder").iterdir()}
    model = randomized(TINY)
    L.load_lora(model, tmp / layout)
    assert (out(model) - expected).abs().max() <= 1e-5


def test_kohya_file_loads_like_ours(tmp_path):
    model = with_lora()
    L.save_lora(model, tmp_path / "a.safetensors")
    sd = load_file(tmp_path / "a.safetensors")
    role = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight", "alpha": "alpha"}
    kohya = {}
    for key, value in sd.items():
        module = key.removeprefix("transformer.")
        for ours, theirs in role.items():
            if module.endswith("." + ours):
                kohya["lora_unet_" + module[: -len(ours) - 1].replace(".", "_") + "." + theirs] = value
    save_file(kohya, tmp_path / "kohya.safetensors")
    a, b = randomized(TINY), randomized(TINY)
    L.load_lora(a, tmp_path / "a.safetensors")
    L.load_lora(b, tmp_path / "kohya.safetensors")
    assert torch.equal(out(a), out(b)) and torch.allclose(out(a), out(model), atol=1e-6)


def test_fuse_then_unfuse_restores_the_base_and_fused_runs_plain(tmp_path):
    model = with_lora()
    base = {k: v.clone() for k, v in randomized(TINY).state_dict().items()}
    unfused = out(model)
    L.fuse_lora(model)
    assert set(model.state_dict()) == set(base)  # the plain structure: no adapter layers, no split pieces
    assert (out(model) - unfused).abs().max() <= 1e-5
    L.unfuse_lora(model)
    assert torch.equal(out(model), unfused) or (out(model) - unfused).abs().max() <= 1e-6
    L.unload_lora(model)
    sd = model.state_dict()
    assert set(sd) == set(base) and max((sd[k] - base[k]).abs().max().item() for k in base) <= 1e-6


def test_scale_zero_is_the_base_and_scales_are_linear_in_the_weights():
    base_out = out(randomized(TINY))
    model = with_lora()
    L.set_adapters(model, ["default"], [0.0])
    assert (out(model) - base_out).abs().max() <= 1e-6
    L.set_adapters(model, ["default"], [1.0])
    L.fuse_lora(model, lora_scale=0.5)  # fused at half strength == unfused at weight 0.5
    fused = out(model)
    L.unfuse_lora(model)
    L.set_adapters(model, "default", 0.5)
    assert (out(model) - fused).abs().max() <= 1e-5


def test_two_adapters_combine_linearly(tmp_path):
    """Adapters a, b at weights (wa, wb): every merged weight is base + wa·Δa + wb·Δb, and the
    unfused forward equals the fused one."""
    for seed, name in ((0, "a"), (1, "b")):
        L.save_lora(with_lora(seed=seed), tmp_path / f"{name}.safetensors")

    def merged(weights):
        model = randomized(TINY)
        for name, w in weights.items():
            L.load_lora(model, tmp_path / f"{name}.safetensors", scale=w, adapter_name=name)
        unfused = out(model)
        L.fuse_lora(model)
        assert (out(model) - unfused).abs().max() <= 1e-5
        return model.state_dict()

    base = randomized(TINY).state_dict()
    da, db, both = merged({"a": 1.0}), merged({"b": 1.0}), merged({"a": 0.7, "b": -0.4})
    for k in base:
        expected = base[k] + 0.7 * (da[k] - base[k]) - 0.4 * (db[k] - base[k])
        assert (both[k] - expected).abs().max() <= 1e-5, k
    assert (da["blocks.0.attn.qkv.weight"] - base["blocks.0.attn.qkv.weight"]).abs().max() > 1e-3


def test_a_lora_for_another_base_is_a_one_line_error_naming_module_and_shapes(tmp_path):
    L.save_lora(with_lora(), tmp_path / "a.safetensors")
    other = randomized(TINY.with_(hidden_size=96, num_heads=4))
    with pytest.raises(PixsigmaError) as e:
        L.load_lora(other, tmp_path / "a.safetensors")
    msg = str(e.value)
    m = re.search(r"LoRA for (\S+) has lora_A (\(.*?\)) and lora_B (\(.*?\)), but this model's (\S+) maps (\d+) -> 96", msg)
    assert "\n" not in msg and m, msg
    sd = load_file(tmp_path / "a.safetensors")
    key = "transformer." + m.group(1)
    assert (m.group(2), m.group(3)) == (str(tuple(sd[key + ".lora_A.weight"].shape)), str(tuple(sd[key + ".lora_B.weight"].shape)))
    assert m.group(4) == L.module_names(other)[m.group(1)]
    assert L.lora_state(other) is None and not L._layers(other)  # nothing was attached


def test_unknown_keys_are_an_error_listing_the_first_ones(tmp_path):
    sd = load_file(L.save_lora(with_lora(), tmp_path / "a.safetensors"))
    sd["transformer.transformer_blocks.0.attn9.to_q.lora_A.weight"] = torch.zeros(4, 64)
    sd["transformer.something_else"] = torch.zeros(1)
    save_file(sd, tmp_path / "bad.safetensors")
    model = randomized(TINY)
    with pytest.raises(PixsigmaError, match=r"2 of \d+ keys are not LoRA weights.*something_else.*attn9.to_q.lora_A.weight"):
        L.load_lora(model, tmp_path / "bad.safetensors")
    assert L.lora_state(model) is None
    del sd["transformer.something_else"], sd["transformer.transformer_blocks.0.attn9.to_q.lora_A.weight"]
    del sd["transformer.transformer_blocks.0.attn1.to_q.lora_B.weight"]
    save_file(sd, tmp_path / "half.safetensors")
    with pytest.raises(PixsigmaError, match="attn1.to_q has only one of its two LoRA matrices"):
        L.load_lora(model, tmp_path / "half.safetensors")


def test_targets_presets_and_names():
    model = randomized(TINY)
    attention = L.resolve_targets(model, "attention")
    assert len(attention) == 2 * 8 and all(".attn" in n for n in attention)
    assert len(L.resolve_targets(model, ["attention+mlp"])) == 2 * 10
    assert sorted(L.resolve_targets(model, ["to_q", "blocks.1.mlp.fc2"])) == [
        "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn2.to_q", "transformer_blocks.1.attn1.to_q",
        "transformer_blocks.1.attn2.to_q", "transformer_blocks.1.ff.net.2"]
    with pytest.raises(PixsigmaError, match=r"\['to_z'\] match no module"):
        L.resolve_targets(model, ["to_q", "to_z"])


@pytest.mark.parametrize("spec", [L.LoraSpec(rank=4, targets=("attention",), use_dora=True),
                                  L.LoraSpec(rank=4, alpha=2, targets=("attention+mlp",), use_rslora=True)])
def test_dora_and_rslora_round_trip_through_our_file(tmp_path, spec):
    model = with_lora(spec)
    L.save_lora(model, tmp_path / "a.safetensors")
    loaded = randomized(TINY)
    L.load_lora(loaded, tmp_path / "a.safetensors")
    assert (out(loaded) - out(model)).abs().max() <= 1e-5
    assert (out(model) - out(randomized(TINY))).abs().max() > 1e-3
