"""Training-free step caching: exact when off, hand-built references for a cached step, the
pipeline and CLI wiring."""

import pytest
import torch

from pixsigma import cli
from pixsigma.diffusion.cache import StepCache, StepCacheConfig, as_cache_config
from pixsigma.errors import PixsigmaError
from pixsigma.pipeline import SigmaPipeline
from pixsigma.pngmeta import read_png_params
from tests.tiny_components import build_pipeline_folder, build_transformer

pytestmark = pytest.mark.usefixtures("single_thread")

DEPTH = 4


@pytest.fixture(scope="module")
def model():
    return build_transformer(caption_channels=32, sample_size=8, hidden=32, depth=DEPTH, heads=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_pipeline_folder(tmp_path_factory.mktemp("cache") / "p", depth=DEPTH)


@pytest.fixture(scope="module")
def pipe(folder):
    return SigmaPipeline.from_pretrained(folder)


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)


def _reference(model, x, t, caption, skip, delta):
    """The forward written out by hand: blocks in `skip` (a range) replaced by adding `delta`
    to the tokens that enter the range; the rest of the forward unchanged."""
    context = model.prepare_caption(caption)
    tokens = model.x_embedder.proj(x).flatten(2).transpose(1, 2) + model.pos_embed(4, 4, x.device, x.dtype)
    temb, t6 = model.embed_timestep(t, x.shape[0])
    inputs = {}
    for i, block in enumerate(model.blocks):
        inputs[i] = tokens
        if skip is not None and skip[0] <= i < skip[1]:
            if i == skip[0]:
                tokens = tokens + delta
            continue
        tokens = block(tokens, t6, context.kv[i], context.mask, (4, 4))
    inputs[len(model.blocks)] = tokens
    out = model.unpatchify(model.final_layer(tokens, temb), 4, 4)
    return out, inputs


def _run(model, cache, steps):
    outs = []
    for x, t, caption in steps:
        cache.start_step(t)
        outs.append(model(x, t, model.prepare_caption(caption), step_cache=cache))
    return outs


def _step(seed, t):
    x, caption = _inputs(seed)
    return x, torch.tensor([float(t)] * 2), caption


@torch.no_grad()
@pytest.mark.parametrize("mode", ["fora", "delta"])
def test_interval_one_equals_no_cache(model, mode):
    steps = [_step(i, t) for i, t in enumerate([999, 700, 400, 100])]
    cached = _run(model, StepCache(StepCacheConfig(mode, interval=1), DEPTH), steps)
    for (x, t, caption), out in zip(steps, cached):
        assert torch.equal(out, model(x, t, caption))


@torch.no_grad()
def test_fora_cached_step_adds_the_recorded_delta_of_every_block(model):
    """Step 1 of interval 2 runs no block: its tokens are this step's embedding plus the whole
    stack's delta recorded at step 0; the final layer sees this step's timestep."""
    steps = [_step(0, 900), _step(1, 800)]
    cache = StepCache(StepCacheConfig("fora", interval=2), DEPTH)
    out0, out1 = _run(model, cache, steps)
    ref0, inputs0 = _reference(model, *steps[0], None, None)
    delta = inputs0[DEPTH] - inputs0[0]
    ref1, _ = _reference(model, *steps[1], (0, DEPTH), delta)
    torch.testing.assert_close(out0, ref0, rtol=0, atol=1e-6)
    torch.testing.assert_close(out1, ref1, rtol=0, atol=1e-6)
    assert not torch.allclose(out1, model(*steps[1]), atol=1e-3)  # it is an approximation
    assert cache.summary()["full_steps"] == 1 and cache.summary()["blocks_skipped"] == 0.5


@torch.no_grad()
def test_delta_caches_rear_blocks_early_and_front_blocks_late(model):
    """Δ-DiT: above the boundary the rear half is skipped, below it the front half; each uses the
    delta its range produced at the last full step, the other blocks run on this step's tokens."""
    steps = [_step(0, 900), _step(1, 800), _step(2, 600), _step(3, 300)]
    cache = StepCache(StepCacheConfig("delta", interval=2, boundary=500), DEPTH)
    outs = _run(model, cache, steps)
    half = DEPTH // 2
    _, inputs0 = _reference(model, *steps[0], None, None)
    ref1, _ = _reference(model, *steps[1], (half, DEPTH), inputs0[DEPTH] - inputs0[half])
    _, inputs2 = _reference(model, *steps[2], None, None)
    ref3, _ = _reference(model, *steps[3], (0, half), inputs2[half] - inputs2[0])
    torch.testing.assert_close(outs[1], ref1, rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[3], ref3, rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[2], model(*steps[2]), rtol=0, atol=1e-6)  # full step


@torch.no_grad()
def test_a_batch_change_runs_the_step_in_full(model):
    """A cached step whose batch differs from the recorded one (guidance switched off by a
    guidance interval) cannot use the deltas: it runs every block."""
    cache = StepCache(StepCacheConfig("fora", interval=4), DEPTH)
    x, t, caption = _step(0, 900)
    _run(model, cache, [(x, t, caption)])
    cache.start_step(t[:1])
    out = model(x[:1], t[:1], model.prepare_caption(caption[:1]), step_cache=cache)
    torch.testing.assert_close(out, model(x[:1], t[:1], caption[:1]), rtol=0, atol=1e-6)


def test_config_checks():
    assert as_cache_config(None) is None and as_cache_config("none") is None
    assert as_cache_config("FORA") == StepCacheConfig("fora")
    assert as_cache_config({"mode": "delta", "interval": 3}).interval == 3
    for bad in ("toca", {"mode": "fora", "interval": 0}, {"mode": "delta", "blocks": 0}, {"mode": "fora", "k": 2}, 3):
        with pytest.raises(PixsigmaError):
            as_cache_config(bad)


def _count_block_calls(pipe, **kwargs):
    calls = []
    hooks = [b.register_forward_hook(lambda *a: calls.append(1)) for b in pipe.transformer.blocks]
    try:
        out = pipe("a red cat", seed=0, num_inference_steps=6, output_type="latent", **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return len(calls), out


def test_pipeline_step_cache_skips_blocks_and_is_exact_at_interval_one(pipe):
    plain_calls, plain = _count_block_calls(pipe)
    one_calls, one = _count_block_calls(pipe, step_cache={"mode": "delta", "interval": 1})
    fora_calls, fora = _count_block_calls(pipe, step_cache="fora")
    delta_calls, delta = _count_block_calls(pipe, step_cache={"mode": "delta", "interval": 3})
    assert plain_calls == one_calls == 6 * DEPTH and torch.equal(plain.images, one.images)
    assert fora_calls == 3 * DEPTH  # steps 0, 2, 4 in full, 1, 3, 5 run no block
    assert delta_calls == 6 * DEPTH - 4 * (DEPTH // 2)  # 2 of 6 steps full, 4 skip half the blocks
    assert fora.info["step_cache"] == {"mode": "fora", "interval": 2}
    assert (fora.images - plain.images).abs().max() > 0
    assert "step_cache" not in plain.info


def test_cli_generate_with_cache(folder, tmp_path, capsys):
    out = tmp_path / "c.png"
    args = ["generate", "a cat", "--model", str(folder), "-o", str(out), "--steps", "2", "--seed", "1"]
    assert cli.main(args + ["--cache", "fora", "--cache-interval", "2"]) == 0
    assert read_png_params(out)["step_cache"] == "fora:2"
    assert cli.main(args + ["--cache", "delta", "--cache-interval", "0", "--overwrite"]) == 2
    assert "interval" in capsys.readouterr().err
