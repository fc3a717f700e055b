"""ControlNet-Transformer (PixArt-δ): the model, its three checkpoint layouts, control images."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from pixsigma.data.control import control_tensor, mask_edges, preprocess, read_control_image
from pixsigma.errors import PixsigmaError
from pixsigma.io import weights_hash
from pixsigma.model.controlnet import ControlNetTransformer, control_steps
from pixsigma.model.controlnet_checkpoint import load_controlnet, read_controlnet, save_controlnet
from pixsigma.model.transformer import KVCompressConfig, PixArtSigmaTransformer, TransformerConfig

pytestmark = pytest.mark.usefixtures("single_thread")

CFG = TransformerConfig(depth=4, hidden_size=48, num_heads=4, patch_size=2, caption_channels=24, max_caption_tokens=8,
                        sample_size=16, pe_interpolation=1.0)
KNOWN = {"num_heads": 4, "sample_size": 16, "pe_interpolation": 1.0}  # what the weights cannot tell


def random_base(config: TransformerConfig = CFG, seed: int = 0) -> PixArtSigmaTransformer:
    torch.manual_seed(seed)
    model = PixArtSigmaTransformer(config).eval()
    with torch.no_grad():  # the from-scratch init zeroes output layers: make every weight matter
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def randomize_controlnet(net: ControlNetTransformer, seed: int = 1) -> ControlNetTransformer:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.controlnet.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


def inputs(hw=(8, 12), batch: int = 2, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *hw, generator=g)
    t = torch.tensor([3.0, 700.0])[:batch]
    cap = torch.randn(batch, 6, CFG.caption_channels, generator=g)
    mask = torch.ones(batch, 6)
    mask[-1, 4:] = 0
    control = torch.randn(batch, 4, *hw, generator=g)
    return x, t, cap, mask, control


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, hw", [
    (CFG, (8, 12)),  # non-square
    (CFG.with_(kv_compress=KVCompressConfig("conv", 2, (0, 1, 3))), (10, 6)),  # compressed base, copies too
    (CFG.with_(micro_conditions=True), (8, 8)),  # PixArt-α style size conditions
])
def test_fresh_controlnet_returns_the_base_output_exactly(config, hw):
    base = random_base(config)
    net = ControlNetTransformer.from_transformer(base, num_blocks=config.depth - 1).eval()
    x, t, cap, mask, control = inputs(hw)
    with torch.no_grad():
        expected = base(x, t, cap, mask)
        assert torch.equal(net(x, t, cap, mask, control=control), expected)
        randomize_controlnet(net)
        assert not torch.allclose(net(x, t, cap, mask, control=control), expected, atol=1e-3)
        assert torch.equal(net(x, t, cap, mask), expected)  # no control: the base
        assert torch.equal(net(x, t, cap, mask, control=control, control_scale=0.0), expected)


def hand_reference(net: ControlNetTransformer, x, t, cap, control, scale: float):
    """PixArt-δ written out: base block 0, then copy i-1 beside base block i, residual after_proj(copy)."""
    base = net.base_model
    p = base.config.patch_size
    h, w = x.shape[-2] // p, x.shape[-1] // p

    def embed(z):
        return base.x_embedder.proj(z).flatten(2).transpose(1, 2) + base.pos_embed(h, w, z.device, z.dtype)

    t_emb, t6 = base.embed_timestep(t, x.shape[0])
    y = base.y_embedder.project(cap)  # every caption token valid: no mask
    tokens, c = embed(x), embed(control)
    tokens = base.blocks[0](tokens, t6, base.blocks[0].cross_attn.caption_kv(y), None, (h, w))
    for i in range(1, base.config.depth):
        if i <= net.num_blocks:
            cb = net.controlnet[i - 1]
            c_in = tokens + cb.before_proj(c) if i == 1 else c
            c = cb.copied_block(c_in, t6, cb.copied_block.cross_attn.caption_kv(y), None, (h, w))
            tokens = tokens + scale * cb.after_proj(c)
        tokens = base.blocks[i](tokens, t6, base.blocks[i].cross_attn.caption_kv(y), None, (h, w))
    return base.unpatchify(base.final_layer(tokens, t_emb), h, w)


@pytest.mark.parametrize("num_blocks", [1, 2, 3])
def test_forward_matches_the_hand_composed_pixart_delta_reference(num_blocks):
    net = randomize_controlnet(ControlNetTransformer.from_transformer(random_base(), num_blocks)).eval()
    x, t, cap, _, control = inputs()
    with torch.no_grad():
        got = net(x, t, cap, None, control=control, control_scale=0.7)
        want = hand_reference(net, x, t, cap, control, 0.7)
    assert (got - want).abs().max() <= 1e-5
    # the copies are the base's own block class, deep copies (separate weights)
    assert type(net.controlnet[0].copied_block) is type(net.base_model.blocks[0])
    assert net.controlnet[0].copied_block.attn.qkv.weight.data_ptr() != net.base_model.blocks[0].attn.qkv.weight.data_ptr()


def test_control_batch_is_shared_and_repeated_for_guidance():
    net = randomize_controlnet(ControlNetTransformer.from_transformer(random_base(), 2)).eval()
    x, t, cap, mask, control = inputs()
    with torch.no_grad():
        one = net(x, t, cap, mask, control=control[:1])
        both = net(x, t, cap, mask, control=control[:1].expand(2, -1, -1, -1))
    assert (one - both).abs().max() <= 1e-5  # the conv may block a batch of 1 differently


def test_only_copies_and_projections_train():
    base = random_base()
    net = ControlNetTransformer.from_transformer(base, 2).train()
    trainable = {id(p) for p in net.trainable_parameters()}
    assert trainable == {id(p) for p in net.parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in base.parameters())
    assert len(trainable) == len(list(net.controlnet.parameters()))
    x, t, cap, mask, control = inputs()
    net(x, t, cap, mask, control=control).square().mean().backward()
    # zero-initialised after_proj: the copies get no gradient yet, after_proj does
    assert net.controlnet[0].after_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.parameters())


def test_bad_control_inputs_are_one_line_errors():
    net = ControlNetTransformer.from_transformer(random_base(), 2).eval()
    x, t, cap, mask, control = inputs()
    with pytest.raises(PixsigmaError, match=r"control latent of shape \(2, 3, 8, 12\); expected \(B, 4, H, W\)"):
        net(x, t, cap, mask, control=control[:, :3])
    with pytest.raises(PixsigmaError, match="control latent is 8x8 but the latents are 8x12"):
        net(x, t, cap, mask, control=control[..., :8])
    with pytest.raises(PixsigmaError, match="out of range for a 4-block base; expected 1..3"):
        ControlNetTransformer(random_base(), 4)


def test_control_steps_follow_the_start_end_fractions():
    assert control_steps(4, 0.25, 0.75) == [False, True, True, False]
    assert control_steps(5) == [True] * 5
    assert control_steps(10, 0.0, 0.5) == [True] * 5 + [False] * 5
    with pytest.raises(PixsigmaError, match="expected 0 <= start < end <= 1"):
        control_steps(4, 0.8, 0.2)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def outputs_equal(a: ControlNetTransformer, b: ControlNetTransformer) -> bool:
    x, t, cap, mask, control = inputs()
    with torch.no_grad():
        return torch.equal(a(x, t, cap, mask, control=control), b(x, t, cap, mask, control=control))


@pytest.mark.parametrize("config", [CFG, CFG.with_(micro_conditions=True)], ids=["sigma", "alpha_micro_conditions"])
def test_official_layout_round_trip(tmp_path, config):
    net = randomize_controlnet(ControlNetTransformer.from_transformer(random_base(config), 2))
    save_controlnet(net, tmp_path / "control.pth", to="official")
    sd = torch.load(tmp_path / "control.pth", weights_only=True)["state_dict"]
    keys = set(sd)
    assert {k.split(".")[0] for k in keys} == {"base_model", "controlnet"}
    assert {"controlnet.0.before_proj.weight", "controlnet.0.before_proj.bias", "controlnet.1.after_proj.weight",
            "controlnet.1.copied_block.attn.qkv.weight", "base_model.blocks.3.mlp.fc2.bias"} <= keys
    assert not any(k.startswith("controlnet.1.before_proj") for k in keys)
    # the official code also saves its fixed position embedding; a flat dict reads too
    sd["base_model.pos_embed"] = torch.zeros(1, 16, 48)
    torch.save(sd, tmp_path / "flat.pth")
    for name in ("control.pth", "flat.pth"):
        loaded = load_controlnet(tmp_path / name, **KNOWN)
        assert loaded.num_blocks == 2 and loaded.config == config
        assert outputs_equal(loaded, net), name
        assert not any(p.requires_grad for p in loaded.parameters())


def test_controlnet_only_file_round_trip_names_its_base(tmp_path):
    base = random_base()
    net = randomize_controlnet(ControlNetTransformer.from_transformer(base, 3))
    save_controlnet(net, tmp_path / "c.safetensors")
    own, file_base, meta = read_controlnet(tmp_path / "c.safetensors")
    assert file_base == {} and all(k.startswith("controlnet.") for k in own)
    assert meta["base_hash"] == weights_hash(base.state_dict()) and meta["num_blocks"] == 3
    assert outputs_equal(load_controlnet(tmp_path / "c.safetensors", base=base), net)
    # the base may be a path too, with load_transformer's overrides
    from pixsigma.model.checkpoint import save_official

    save_official(base, tmp_path / "base.pth")
    assert outputs_equal(load_controlnet(tmp_path / "c.safetensors", base=tmp_path / "base.pth", **KNOWN), net)


def test_base_mismatch_is_a_one_line_error(tmp_path, caplog):
    base = random_base()
    save_controlnet(ControlNetTransformer.from_transformer(base, 2), tmp_path / "c.safetensors")
    want = weights_hash(base.state_dict())
    with pytest.raises(PixsigmaError, match=f"holds no base model; pass base=.*weights hash {want}"):
        load_controlnet(tmp_path / "c.safetensors")
    other = random_base(seed=5)
    with pytest.raises(PixsigmaError) as e:
        load_controlnet(tmp_path / "c.safetensors", base=other)
    assert str(e.value) == (f"{tmp_path / 'c.safetensors'}: trained on the base with weights hash {want}, but the given "
                            f"base has {weights_hash(other.state_dict())}; expected the same base model")
    wider = random_base(CFG.with_(hidden_size=64))
    with pytest.raises(PixsigmaError, match=r"\(the ControlNet on this base\): key controlnet.0.before_proj.weight has shape \(48, 48\) but the model expects \(64, 64\)"):
        load_controlnet(renamed_base(tmp_path / "c.safetensors", wider), base=wider)
    # a base in another dtype cannot be hashed against the saved one: a warning, and it loads
    with caplog.at_level(logging.WARNING):
        load_controlnet(tmp_path / "c.safetensors", base=copy.deepcopy(base).to(torch.bfloat16))
    assert "hash not checked" in caplog.text


def renamed_base(path, base):
    """A copy of a ControlNet-only file whose metadata names `base`, so that only the shapes can fail."""
    from safetensors.torch import load_file, save_file

    _, _, meta = read_controlnet(path)
    meta["base_hash"] = weights_hash(base.state_dict())
    out = path.with_name("renamed.safetensors")
    save_file(load_file(path), out, metadata={"pixsigma_controlnet": json.dumps(meta)})
    return out


def test_diffusers_adapter_layout_round_trip_and_parity_with_diffusers_blocks(tmp_path):
    from diffusers import PixArtTransformer2DModel
    from safetensors.torch import load_file

    from pixsigma.model.checkpoint import save_diffusers

    base = random_base()
    net = randomize_controlnet(ControlNetTransformer.from_transformer(base, 2)).eval()
    save_controlnet(net, tmp_path / "adapter", to="diffusers")
    config = json.loads((tmp_path / "adapter" / "config.json").read_text())
    assert (config["_class_name"], config["num_layers"]) == ("PixArtControlNetAdapterModel", 2)
    adapter = load_file(tmp_path / "adapter" / "diffusion_pytorch_model.safetensors")
    assert outputs_equal(load_controlnet(tmp_path / "adapter", base=base), net)

    # diffusers' own blocks loaded with the adapter's weights, composed as PixArt-δ, give our output
    save_diffusers(base, tmp_path / "base_diffusers")
    dm = PixArtTransformer2DModel.from_pretrained(tmp_path / "base_diffusers", low_cpu_mem_usage=False).eval()
    copies, projections = [], {}
    for i in range(2):
        block = copy.deepcopy(dm.transformer_blocks[i])
        prefix = f"controlnet_blocks.{i}.transformer_block."
        block.load_state_dict({k[len(prefix):]: v for k, v in adapter.items() if k.startswith(prefix)}, strict=True)
        copies.append(block)
        for name in ("before_proj", "after_proj"):
            if f"controlnet_blocks.{i}.{name}.weight" in adapter:
                lin = torch.nn.Linear(48, 48)
                lin.load_state_dict({"weight": adapter[f"controlnet_blocks.{i}.{name}.weight"],
                                     "bias": adapter[f"controlnet_blocks.{i}.{name}.bias"]})
                projections[(i, name)] = lin
    x, t, cap, _, control = inputs(hw=(16, 16))
    with torch.no_grad():
        hs, cs = dm.pos_embed(x), dm.pos_embed(control)
        ts, emb_t = dm.adaln_single(t, {"resolution": None, "aspect_ratio": None}, batch_size=2, hidden_dtype=hs.dtype)
        enc = dm.caption_projection(cap)
        for i, block in enumerate(dm.transformer_blocks):
            if 1 <= i <= 2:
                if i == 1:
                    cs = hs + projections[(0, "before_proj")](cs)
                cs = copies[i - 1](cs, encoder_hidden_states=enc, timestep=ts)
                hs = hs + projections[(i - 1, "after_proj")](cs)
            hs = block(hs, encoder_hidden_states=enc, timestep=ts)
        shift, scale = (dm.scale_shift_table[None] + emb_t[:, None]).chunk(2, dim=1)
        hs = dm.proj_out(dm.norm_out(hs) * (1 + scale) + shift)
        hs = hs.reshape(2, 8, 8, 2, 2, 8).permute(0, 5, 1, 3, 2, 4).reshape(2, 8, 16, 16)
        ours = net(x, t, cap, None, control=control)
    assert (ours - hs).abs().max() <= 1e-4


def test_unreadable_checkpoints_are_one_line_errors(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PixsigmaError, match="junk.pth: (not a readable PyTorch checkpoint|refused)"):
        load_controlnet(tmp_path / "junk.pth")
    with pytest.raises(PixsigmaError, match="does not exist"):
        load_controlnet(tmp_path / "missing.safetensors")
    base = random_base()
    from pixsigma.model.checkpoint import save_safetensors

    save_safetensors(base, tmp_path / "plain.safetensors")
    with pytest.raises(PixsigmaError, match="no controlnet.<i>.\\* weights; is this a ControlNet checkpoint"):
        load_controlnet(tmp_path / "plain.safetensors", base=base)


# ---------------------------------------------------------------------------------------------
# Control images
# ---------------------------------------------------------------------------------------------


def square_image(size: int = 32, lo: int = 8, hi: int = 24) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    img[lo:hi, lo:hi] = 255
    return img


def test_canny_finds_the_square_outline_and_mask_edges_is_exact():
    edges = preprocess(square_image(), "canny")[..., 0] > 0
    assert edges[8:24, 8:24][1:-1, 1:-1].sum() <= 4 * 14  # near the border, not across the interior
    assert not edges[:6].any() and not edges[11:21, 11:21].any()
    assert edges[8:24, 7:9].any() and edges[7:9, 8:24].any()
    exact = mask_edges(square_image()[..., 0])[..., 0] > 0
    want = np.zeros((32, 32), bool)
    want[8:24, 8:24] = True
    want[9:23, 9:23] = False
    assert np.array_equal(exact, want)
    gray = preprocess(square_image(), "mask")
    assert gray.shape == (32, 32, 3) and set(np.unique(gray)) == {0, 255}


def test_toy_renderer_mask_gives_exact_control_maps():
    from pixsigma.toy.render import render_mask
    from pixsigma.toy.scene import Scene, SceneObject

    scene = Scene(objects=[SceneObject(shape="square", color="red", x=0.5, y=0.5, size=0.5)], background="white")
    edges = mask_edges(render_mask(scene, size=32, supersample=1))[..., 0] > 0
    assert edges.sum() == 4 * 16 - 4 and edges[8, 8:24].all() and not edges[9:23, 9:23].any()


def test_control_image_reading_and_fitting(tmp_path):
    Image.fromarray(square_image(40)).save(tmp_path / "c.png")
    Image.fromarray(square_image(40)[..., 0]).save(tmp_path / "gray.png")
    t = control_tensor(tmp_path / "c.png", 16, 32, "none")
    assert t.shape == (1, 3, 16, 32) and 0 <= t.min() and t.max() <= 1
    assert torch.equal(control_tensor(tmp_path / "gray.png", 16, 32), t)  # 1 channel = gray replicated
    rgba = np.dstack([square_image(40), np.full((40, 40), 255, np.uint8)])
    assert np.array_equal(read_control_image(rgba), square_image(40))  # an opaque alpha is dropped
    assert read_control_image(torch.ones(3, 8, 8)).shape == (8, 8, 3)


def test_bad_control_images_are_one_line_errors(tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(PixsigmaError) as e:
        read_control_image(tmp_path / "bad.png")
    assert "cannot read the control image" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PixsigmaError, match=r"has shape \(8, 8, 2\) \(2 channels\); expected 1 \(grayscale\) or 3"):
        read_control_image(np.zeros((8, 8, 2), np.uint8))
    translucent = np.zeros((8, 8, 4), np.uint8)
    with pytest.raises(PixsigmaError, match="4 channels"):
        read_control_image(translucent)
    with pytest.raises(PixsigmaError, match="unknown control type 'hed'"):
        preprocess(square_image(), "hed")


def test_dataset_records_name_their_control_image(tmp_path):
    from pixsigma.data.datasets import CaptionDataset

    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("a", "b"):
        Image.fromarray(square_image(16)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"caption {name}")
    Image.fromarray(mask_edges(square_image(16)[..., 0])).save(folder / "a.control.png")
    samples = CaptionDataset(folder).samples
    assert [s.prompt for s in samples] == ["caption a", "caption b"]  # a.control.png is not a sample
    assert samples[0].control == str((folder / "a.control.png").resolve()) and samples[1].control is None
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "folder/a.png", "prompt": "p", "control": "folder/a.control.png"}) + "\n")
    assert CaptionDataset(manifest).samples[0].control == str((folder / "a.control.png").resolve())
