"""SigmaPipeline: parity with diffusers' PixArtSigmaPipeline, samplers, CFG, sizes, errors, 4K, CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pixsigma import cli
from pixsigma.diffusion.gaussian import linear_betas
from pixsigma.diffusion.iddpm import IDDPMSchedule
from pixsigma.diffusion.samplers import SAMPLERS, sample
from pixsigma.errors import PixsigmaError
from pixsigma.model.checkpoint import save_transformer
from pixsigma.model.transformer import KVCompressConfig
from pixsigma.pipeline import SigmaPipeline
from pixsigma.resolution import aspect_ratio_bins
from pixsigma.pngmeta import read_png_params
from tests.test_samplers import release_scheduler
from tests.tiny_components import build_pipeline_folder, build_transformer

PROMPT = "A Photo of a red cat sitting on a wooden table"


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_pipeline_folder(tmp_path_factory.mktemp("pipe") / "p")


@pytest.fixture(scope="module")
def pipe(folder):
    return SigmaPipeline.from_pretrained(folder, lowercase=True)  # diffusers lowercases prompts


@pytest.fixture(scope="module")
def theirs(folder):
    from diffusers import PixArtSigmaPipeline

    p = PixArtSigmaPipeline.from_pretrained(folder)
    p.set_progress_bar_config(disable=True)
    return p


def _noise(seed=0, shape=(1, 4, 16, 16)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# parity with diffusers
# ---------------------------------------------------------------------------------------------


def _both(pipe, theirs, sampler, output_type, lat, **kwargs):
    common = dict(height=32, width=32, guidance_scale=4.5, negative_prompt="blurry", max_sequence_length=16,
                  output_type=output_type, **kwargs)
    ours = pipe(PROMPT, latents=lat, sampler=sampler, generator=torch.Generator().manual_seed(1), **common).images
    ref = theirs(PROMPT, latents=lat.clone(), use_resolution_binning=False, clean_caption=False,
                 generator=torch.Generator().manual_seed(1), **common).images
    return ours, ref


def test_parity_with_diffusers_dpm_solver_cfg(pipe, theirs, folder):
    """Same prompt, negative prompt, initial latents: images within 1e-4 mean abs (0..1). diffusers'
    scheduler is built from the release's values written out in the test, not from our config."""
    theirs.scheduler = release_scheduler("dpm-solver")
    lat = _noise()
    ours_img, ref_img = _both(pipe, theirs, "dpm-solver", "np", lat, num_inference_steps=8)
    assert ours_img.shape == ref_img.shape == (1, 32, 32, 3)
    assert np.abs(ours_img - ref_img).mean() < 1e-4
    ours_lat, ref_lat = _both(pipe, theirs, "dpm-solver", "latent", lat, num_inference_steps=8)
    err = (ours_lat - ref_lat).abs().mean()
    assert err <= 1e-4 * ref_lat.abs().mean()
    # the comparison is sensitive: another prompt moves the latents far more than the tolerance
    other = pipe("a painting of a blue house", latents=lat, output_type="latent", num_inference_steps=8, height=32,
                 width=32, negative_prompt="blurry", max_sequence_length=16).images
    assert (other - ours_lat).abs().mean() > 100 * err


@pytest.mark.parametrize("sampler", ["ddim", "euler", "sa-solver"])
def test_parity_with_diffusers_other_schedulers(pipe, theirs, sampler):
    theirs.scheduler = release_scheduler(sampler)
    ours_lat, ref_lat = _both(pipe, theirs, sampler, "latent", _noise(), num_inference_steps=4)
    assert (ours_lat - ref_lat).abs().mean() <= 1e-4 * ref_lat.abs().mean()


# ---------------------------------------------------------------------------------------------
# samplers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_each_sampler_runs(pipe, sampler):
    seen = []
    out = pipe("a cat", sampler=sampler, num_inference_steps=3, seed=0, output_type="np",
               callback=lambda i, t, x: seen.append(i))
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()
    assert seen == [0, 1, 2]
    assert out.info["sampler"] == sampler


def test_each_sampler_name_runs_its_own_sampler_with_its_default_steps(pipe, monkeypatch):
    """From the same latents and generator the five samplers give pairwise different latents, and
    with no step count each calls the transformer its default number of times (one batched
    guided forward per step): the release's 20 / 25 / 100, 50 / 30 for DDIM / Euler and PixArt-LCM's 4."""
    defaults = {"dpm-solver": 20, "sa-solver": 25, "ddim": 50, "euler": 30, "iddpm": 100, "lcm": 4}
    assert set(defaults) == set(SAMPLERS)
    lat = _noise(2)
    outs = {}
    for sampler in defaults:
        outs[sampler] = pipe("a cat", sampler=sampler, num_inference_steps=3, latents=lat, output_type="latent",
                             generator=torch.Generator().manual_seed(0)).images
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            scale = outs[a].abs().mean()
            assert (outs[a] - outs[b]).abs().mean() > 1e-2 * scale, (a, b)
    calls = []
    forward = pipe.transformer.forward
    monkeypatch.setattr(pipe.transformer, "forward", lambda x, *a, **k: calls.append(x.shape[0]) or forward(x, *a, **k))
    for sampler, steps in defaults.items():
        calls.clear()
        out = pipe("a cat", sampler=sampler, height=16, width=16, use_resolution_binning=False, seed=0,
                   output_type="latent")
        assert calls == [2] * steps and out.info["steps"] == steps, sampler


def test_unknown_sampler_lists_choices(pipe):
    with pytest.raises(PixsigmaError) as e:
        pipe("a cat", sampler="heun")
    for name in SAMPLERS:
        assert name in str(e.value)


def test_nan_stops_with_step():
    calls = []

    def model_fn(x, t):
        calls.append(t)
        out = torch.zeros(x.shape[0], 8, *x.shape[2:])
        if len(calls) == 3:
            out[0, 0, 0, 0] = float("nan")
        return out

    for sampler in ("dpm-solver", "iddpm"):
        calls.clear()
        with pytest.raises(PixsigmaError, match=r"step 3/5"):
            sample(model_fn, torch.randn(1, 4, 8, 8), sampler=sampler, steps=5)


def _numpy_learned_log_variance(T, steps, i, v):
    """Independent computation of IDDPM's learned-range variance on a respaced schedule."""
    betas = np.linspace(1e-4, 0.02, T)
    acp = np.cumprod(1 - betas)
    use = sorted({int(round(k * (T - 1) / (steps - 1))) for k in range(steps)})
    last, new_betas = 1.0, []
    for t in use:
        new_betas.append(1 - acp[t] / last)
        last = acp[t]
    new_betas = np.array(new_betas)
    a = np.cumprod(1 - new_betas)
    a_prev = np.concatenate([[1.0], a[:-1]])
    post = new_betas * (1 - a_prev) / (1 - a)
    post_clipped = np.log(np.concatenate([[post[1]], post[1:]]))
    frac = (v + 1) / 2
    return frac * np.log(new_betas[i]) + (1 - frac) * post_clipped[i], use


@pytest.mark.parametrize("i", [0, 1, 37, 99])
def test_iddpm_learned_variance_formula(i):
    sched = IDDPMSchedule(linear_betas(1000), 100)
    v = np.linspace(-1, 1, 7)
    expected, use = _numpy_learned_log_variance(1000, 100, i, v)
    got = sched.learned_log_variance(i, torch.tensor(v, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert list(sched.timesteps) == use and sched.timesteps[0] == 0 and sched.timesteps[-1] == 999


def test_iddpm_sampler_uses_the_learned_half():
    def make(vvalue):
        def model_fn(x, t):
            return torch.cat([torch.zeros_like(x), torch.full_like(x, vvalue)], dim=1)
        return model_fn

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    lo = sample(make(-1.0), x, "iddpm", steps=10, generator=torch.Generator().manual_seed(1))
    hi = sample(make(1.0), x, "iddpm", steps=10, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(lo, hi)
    assert hi.std() > lo.std()  # max variance (β) adds more noise than the posterior variance


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------


def test_deterministic_and_seed_sensitive(pipe):
    a = pipe("a red cat", seed=5, num_inference_steps=3, output_type="np").images
    b = pipe("a red cat", seed=5, num_inference_steps=3, output_type="np").images
    c = pipe("a red cat", seed=6, num_inference_steps=3, output_type="np").images
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_cfg_is_one_batched_forward_with_one_caption_context(pipe, monkeypatch):
    calls, prepared = [], []
    forward = pipe.transformer.forward
    prepare = pipe.transformer.prepare_caption
    monkeypatch.setattr(pipe.transformer, "forward", lambda x, *a, **k: calls.append(x.shape[0]) or forward(x, *a, **k))
    monkeypatch.setattr(pipe.transformer, "prepare_caption", lambda *a, **k: prepared.append(1) or prepare(*a, **k))
    pipe(["a cat", "a dog"], num_inference_steps=4, seed=0, output_type="latent", num_images_per_prompt=2)
    assert calls == [8] * 4 and len(prepared) == 1
    calls.clear()
    pipe("a cat", num_inference_steps=2, seed=0, output_type="latent", guidance_scale=1.0)
    assert calls == [1, 1]


def test_guidance_interval_guides_only_inside_it(pipe, folder, tmp_path, monkeypatch):
    """Guided steps inside the interval (one doubled batch), conditional-only steps outside it;
    (0, 999) is plain guidance; an interval no step falls in is guidance off."""
    kw = dict(num_inference_steps=4, seed=0, output_type="latent")
    full = pipe("a red cat", **kw).images
    torch.testing.assert_close(pipe("a red cat", guidance_interval=(0, 999), **kw).images, full, rtol=0, atol=0)
    off = pipe("a red cat", guidance_scale=1.0, **kw).images
    torch.testing.assert_close(pipe("a red cat", guidance_interval=(999.5, 999.9), **kw).images, off, rtol=1e-5, atol=1e-5)
    calls, steps = [], []
    forward = pipe.transformer.forward
    monkeypatch.setattr(pipe.transformer, "forward", lambda x, t, *a, **k: calls.append(x.shape[0]) or steps.append(int(t[0])) or forward(x, t, *a, **k))
    half = pipe("a red cat", guidance_interval=(500, 999), **kw).images
    assert [n for n in calls] == [2 if t >= 500 else 1 for t in steps] and 1 in calls and 2 in calls
    assert not torch.allclose(half, full) and not torch.allclose(half, off)
    monkeypatch.undo()
    with pytest.raises(PixsigmaError, match="guidance interval"):
        pipe("a red cat", guidance_interval=(600, 300), **kw)
    # a model folder may name its default interval; a call can still ask for every step
    copy = tmp_path / "gi"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "pixsigma_guidance_interval": [500, 999]}))
    p2 = SigmaPipeline.from_pretrained(copy, lowercase=True)
    assert p2.guidance_interval == (500.0, 999.0)
    torch.testing.assert_close(p2("a red cat", **kw).images, half, rtol=0, atol=0)
    torch.testing.assert_close(p2("a red cat", guidance_interval=(0, 999), **kw).images, full, rtol=0, atol=0)
    out = tmp_path / "gi.png"
    res = _cli("generate", "a red cat", "--model", str(folder), "-o", str(out), "--steps", "2", "--guidance-interval", "500,999")
    assert res.returncode == 0, res.stderr[-2000:]
    assert read_png_params(out)["guidance_interval"] == "500,999"
    res = _cli("generate", "a red cat", "--model", str(folder), "-o", str(tmp_path / "gi2.png"), "--guidance-interval", "500")
    assert res.returncode == 2 and "T_MIN,T_MAX" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "gi2.png").exists()


ACP_999 = float(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[999])  # ᾱ at t = 999, float64


def _one_step_reference(pipe, latents, cond, uncond, scale=4.5, prediction="epsilon"):
    """What one DPM-Solver++ step (t = 999 to the end: the step returns its x0 prediction) must
    give, built by hand: two separate transformer calls, one per caption (embedding, mask), the
    guided output uncond + scale·(cond − uncond), and x0 from it in float64."""
    tr = pipe.transformer
    t = torch.tensor([999])
    outs = [tr(latents, t, tr.prepare_caption(emb, mask))[:, :4].double() for emb, mask in (uncond, cond)]
    pred = outs[0] + scale * (outs[1] - outs[0])
    x, a, s = latents.double(), ACP_999 ** 0.5, (1 - ACP_999) ** 0.5
    return (x - s * pred) / a if prediction == "epsilon" else a * x - s * pred


def _close(got, ref, rel=1e-5):
    return (got.double() - ref).abs().max() <= rel * ref.abs().max()


def test_negative_prompt_is_the_unconditional_branch(pipe):
    """One step with a negative prompt equals the hand-built guidance whose unconditional call
    reads the negative prompt's embedding (and not the empty prompt's)."""
    lat, te = _noise(3), pipe.text_encoder
    kw = dict(latents=lat, num_inference_steps=1, output_type="latent", sampler="dpm-solver")
    got = pipe("a red cat", negative_prompt="a blue house", **kw).images
    cond = te.encode(["a red cat"], te.max_length)
    ref = _one_step_reference(pipe, lat, cond, te.encode(["a blue house"], te.max_length))
    assert _close(got, ref)
    empty_ref = _one_step_reference(pipe, lat, cond, te.encode([""], te.max_length))
    assert not _close(got, empty_ref, rel=1e-2)
    assert _close(pipe("a red cat", **kw).images, empty_ref)  # the default negative prompt is ""
    empty = pipe("", seed=0, num_inference_steps=3, output_type="pil").images
    assert empty[0].size == (32, 32)


def test_batches_and_output_types(pipe):
    out = pipe(["a cat", "a dog"], negative_prompt=["ugly", "blurry"], num_images_per_prompt=2, seed=0,
               num_inference_steps=2, output_type="pil")
    assert len(out.images) == 4 and all(im.size == (32, 32) for im in out.images)
    assert set(out.timings) == {"text", "denoise", "decode"}
    with pytest.raises(PixsigmaError):
        pipe("a cat", output_type="jpeg")
    with pytest.raises(PixsigmaError):
        pipe(["a", "b"], negative_prompt=["x"])


def test_sizes_binning_and_inline_options(pipe):
    out = pipe("a cat", height=37, width=53, seed=0, num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 37, 53, 3)
    gen = (out.info["generated_height"], out.info["generated_width"])
    assert gen in aspect_ratio_bins(32, 4).values() and gen[0] < gen[1]  # a bin of the tiny 32 px model
    out = pipe("a cat", height=30, width=50, seed=0, num_inference_steps=2, output_type="np", use_resolution_binning=False)
    assert out.images.shape == (1, 30, 50, 3) and out.info["generated_height"] == 32 and out.info["generated_width"] == 52
    out = pipe("a cat --hw 20:44", seed=0, num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 20, 44, 3) and out.info["prompts"] == ["a cat"]
    out = pipe("a cat --ar 2:1", seed=0, num_inference_steps=2, output_type="np")
    h, w = out.images.shape[1:3]
    assert h / w == pytest.approx(2.0, rel=0.05)
    for bad in [dict(height=0), dict(width=-3), dict(height=9000), dict(height="big")]:
        with pytest.raises(PixsigmaError):
            pipe("a cat", num_inference_steps=1, **bad)


def test_transformer_override_files(pipe, folder, tmp_path):
    lat = _noise()
    ref = pipe("a cat", latents=lat, num_inference_steps=2, output_type="latent").images
    save_transformer(pipe.transformer, tmp_path / "t.safetensors", to="safetensors")
    save_transformer(pipe.transformer, tmp_path / "t.pth", to="official")
    overrides = {"sample_size": 16, "pe_interpolation": 1.0, "num_heads": 2}  # what a .pth cannot tell
    for path, extra in ((tmp_path / "t.safetensors", None), (tmp_path / "t.pth", overrides)):
        other = SigmaPipeline.from_pretrained(folder, transformer=path, lowercase=True, transformer_overrides=extra)
        assert torch.allclose(other("a cat", latents=lat, num_inference_steps=2, output_type="latent").images, ref)


def test_layout_errors(folder, tmp_path, monkeypatch):
    import pixsigma.pipeline as P

    monkeypatch.setattr(P, "DEFAULT_MODEL_DIR", tmp_path / "default_model")
    with pytest.raises(PixsigmaError, match="default_model"):
        SigmaPipeline.from_pretrained(None)
    with pytest.raises(PixsigmaError, match="does not exist"):
        SigmaPipeline.from_pretrained(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    (broken / "transformer").mkdir(parents=True)
    with pytest.raises(PixsigmaError, match=r"vae/"):
        SigmaPipeline.from_pretrained(broken)
    wide = build_transformer(caption_channels=48)
    with pytest.raises(PixsigmaError, match=r"48.*32|32.*48"):
        SigmaPipeline.from_pretrained(folder, transformer=wide)


def test_default_model_without_text_encoder_uses_minilm(tmp_path, monkeypatch):
    import pixsigma.pipeline as P

    default = build_pipeline_folder(tmp_path / "default_model", caption_channels=384, with_text=False)
    monkeypatch.setattr(P, "DEFAULT_MODEL_DIR", default)
    p = SigmaPipeline.from_pretrained(None)
    assert p.text_encoder.hidden_size == 384 and p.name == "default"
    out = p("a small cactus", seed=0, num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 32, 32, 3)


# ---------------------------------------------------------------------------------------------
# 4K
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_4096_generation_completes(tmp_path):
    """4096² with a factor-8 VAE: a 512² latent, 65,536 tokens at patch 2, KV compression in
    one of two layers, tiled VAE decoding (25 tiles of 1024² px). ~26 s on one thread."""
    folder = build_pipeline_folder(tmp_path / "p4k", sample_size=512, vae_levels=4, vae_channels=8, vae_groups=4,
                                   vae_layers_per_block=0, vae_mid_attention=False, hidden=16)
    model = build_transformer(32, 512, hidden=16, depth=2, heads=2, kv_compress=KVCompressConfig("conv", 2, (1,)))
    pipe = SigmaPipeline.from_pretrained(folder, transformer=model)
    assert pipe.resolution == 4096
    out = pipe("a cat", height=4096, width=4096, num_inference_steps=1, guidance_scale=1.0, seed=0, output_type="pt")
    assert out.images.shape == (1, 3, 4096, 4096)
    assert out.info["generated_height"] == 4096


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pixsigma.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_generate_and_info_roundtrip_subprocess(folder, tmp_path):
    out = tmp_path / "img.png"
    res = _cli("generate", "a red cat", "--model", str(folder), "-o", str(out), "--seed", "7", "--steps", "2",
               "--cfg", "3", "--size", "40x24", "--negative", "ugly")
    assert res.returncode == 0, res.stderr[-2000:]
    params = read_png_params(out)
    assert params["prompt"] == "a red cat" and params["negative"] == "ugly" and params["seed"] == 7
    assert params["steps"] == 2 and params["cfg"] == 3.0 and params["sampler"] == "dpm-solver"
    assert params["size"] == "40x24" and params["model"] == "p" and len(params["model_hash"]) == 12
    res = _cli("info", str(out))
    assert res.returncode == 0 and "seed: 7" in res.stdout and "prompt: a red cat" in res.stdout
    # bad input: one line, exit 2, no traceback
    for args in (["--sampler", "heun"], ["--size", "0x64"], ["--size", "wide"]):
        res = _cli("generate", "a cat", "--model", str(folder), "-o", str(tmp_path / "bad.png"), *args)
        assert res.returncode == 2
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_cli_prompts_file_numbering_and_overwrite(folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n\n  \na blue house --ar 1:2\nan astronaut\n")
    out = tmp_path / "batch.png"
    base = ["generate", "--prompts-file", str(prompts), "--model", str(folder), "-o", str(out), "--steps", "1", "--seed", "3"]
    assert cli.main(base) == 0
    files = sorted(p.name for p in tmp_path.glob("batch*.png"))
    assert files == ["batch-000.png", "batch-001.png", "batch-002.png"]
    seeds = [read_png_params(tmp_path / f)["seed"] for f in files]
    assert seeds == [3, 4, 5]
    before = (tmp_path / "batch-001.png").read_bytes()
    capsys.readouterr()
    assert cli.main(base + ["--seed", "9"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "batch-001.png").read_bytes() == before
    assert cli.main(base + ["--seed", "9", "--overwrite"]) == 0
    assert read_png_params(tmp_path / "batch-001.png")["seed"] == 10
    # -n N numbers the images too
    assert cli.main(["generate", "a cat", "--model", str(folder), "-o", str(tmp_path / "n.png"), "-n", "2", "--steps", "1"]) == 0
    assert sorted(p.name for p in tmp_path.glob("n*.png")) == ["n-000.png", "n-001.png"]
    # info on something that is not ours
    (tmp_path / "plain.txt").write_text("x")
    assert cli.main(["info", str(tmp_path / "plain.txt")]) == 2
    capsys.readouterr()
    assert cli.main(["info", str(tmp_path / "batch-000.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 9


def test_null_caption_unconditional_branch(folder):
    """The official sampler's unconditional branch: the null caption with the prompt's mask, checked
    against a hand-built guided step whose unconditional call reads y_embedding directly."""
    pipe = SigmaPipeline.from_pretrained(folder)
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    base = pipe("a red cat", num_inference_steps=3, latents=latents, output_type="latent", use_resolution_binning=False,
                height=64, width=64).images
    pipe.null_caption_uncond = True
    null = pipe("a red cat", num_inference_steps=3, latents=latents, output_type="latent", use_resolution_binning=False,
                height=64, width=64).images
    assert not torch.allclose(base, null)
    te = pipe.text_encoder
    emb, mask = te.encode(["a red cat"], te.max_length)
    y_null = pipe.transformer.y_embedder.y_embedding[:te.max_length][None].detach()
    one = pipe("a red cat", num_inference_steps=1, latents=latents, output_type="latent", use_resolution_binning=False,
               height=64, width=64).images
    assert _close(one, _one_step_reference(pipe, latents, (emb, mask), (y_null, mask)))
    # a non-empty negative prompt is used as is, whatever the setting
    neg = [pipe("a red cat", negative_prompt="blue", num_inference_steps=3, latents=latents, output_type="latent",
                use_resolution_binning=False, height=64, width=64).images for pipe.null_caption_uncond in (False, True)]
    assert torch.equal(neg[0], neg[1])


@pytest.mark.skipif(not any(shutil.which(c) for c in ("cc", "g++", "c++")),
                    reason="torch.compile (inductor) needs a C++ compiler on CPU: none of cc, g++, c++ is on PATH")
def test_compiled_transformer_matches_eager(folder):
    """enable_compile (torch.compile, inductor with frozen weights) leaves the images unchanged
    (fp32, float tolerance) on a model with KV compression, and runs the compiled module."""
    model = build_transformer(kv_compress=KVCompressConfig(operator="conv", ratio=2, layers=(1,)))
    eager = SigmaPipeline.from_pretrained(folder, transformer=model)
    lat = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    kwargs = dict(latents=lat, num_inference_steps=3, output_type="latent", use_resolution_binning=False, height=64, width=64)
    ref = eager("a red cat", **kwargs).images
    fresh = build_transformer(kv_compress=KVCompressConfig(operator="conv", ratio=2, layers=(1,)))  # same seed, empty caches
    compiled = SigmaPipeline.from_pretrained(folder, transformer=fresh).enable_compile()
    calls = []
    inner = compiled._compiled
    compiled._compiled = lambda *a, **k: calls.append(1) or inner(*a, **k)
    with torch._dynamo.config.patch(error_on_recompile=True):  # one compile serves every step
        out = compiled("a red cat", **kwargs).images
    assert len(calls) == 3
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_compile_failure_is_one_clear_error(folder):
    pipe = SigmaPipeline.from_pretrained(folder)

    def broken(*args, **kwargs):
        raise torch._dynamo.exc.BackendCompilerFailed(lambda: None, RuntimeError("no C++ compiler found"), None)

    pipe._compiled = broken
    with pytest.raises(PixsigmaError, match="torch.compile could not compile the transformer.*C\\+\\+ compiler"):
        pipe("a cat", num_inference_steps=2, seed=0, output_type="latent")


@pytest.mark.parametrize("sampler", ["dpm-solver", "ddim", "euler", "iddpm"])
def test_v_prediction_sampling_equals_the_equivalent_eps_model(sampler):
    """A model predicting v = sqrt(ᾱ)ε − sqrt(1−ᾱ)x0 samples to the same latents as the ε model it is
    equivalent to, with every sampler (diffusers' schedulers and the IDDPM one)."""
    from pixsigma.diffusion.samplers import DEFAULT_SCHEDULE

    acp = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(3)) * 0.3

    def eps_fn(x, t):  # a smooth nonlinear stand-in for a network, with a learned-variance half
        e = torch.tanh(torch.einsum("oc,bchw->bohw", w, x)) + 0.1 * x
        return torch.cat([e, torch.full_like(x, 0.3)], dim=1)

    sigmas = ((1 - acp) / acp).sqrt().numpy()

    def v_fn(x_in, t):
        # x_in is the scheduler's model input, x_t in the VP scaling for every sampler here; Euler's
        # timesteps are fractional and its σ is interpolated linearly in t, so ᾱ is taken the same way
        out = eps_fn(x_in, t)
        abar = 1.0 / (1.0 + float(np.interp(float(t), np.arange(1000), sigmas)) ** 2)
        a, s = abar ** 0.5, (1 - abar) ** 0.5
        return torch.cat([(out[:, :4] - s * x_in) / a, out[:, 4:]], dim=1)

    x = _noise(5, (2, 4, 8, 8))
    common = dict(steps=6, generator=torch.Generator().manual_seed(2))
    ref = sample(eps_fn, x, sampler, **common)
    common["generator"] = torch.Generator().manual_seed(2)
    got = sample(v_fn, x, sampler, prediction_type="v_prediction", **common)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert DEFAULT_SCHEDULE["prediction_type"] == "epsilon"
    with pytest.raises(PixsigmaError, match="prediction_type 'sample' is not supported"):
        sample(eps_fn, x, sampler, prediction_type="sample", steps=2)


def test_pipeline_samples_with_the_transformers_prediction_type(folder, tmp_path):
    """A v-prediction checkpoint (config in its metadata) makes the pipeline sample with v; the same
    weights read as ε give other images."""
    ours = SigmaPipeline.from_pretrained(folder)
    eps_img = ours("a red cat", height=32, width=32, num_inference_steps=3, output_type="latent", latents=_noise(0)).images
    v_model = ours.transformer
    v_model.config = v_model.config.with_(prediction_type="v_prediction")
    save_transformer(v_model, tmp_path / "v.safetensors")
    v_pipe = SigmaPipeline.from_pretrained(folder, transformer=tmp_path / "v.safetensors")
    assert v_pipe.transformer.config.prediction_type == "v_prediction" and v_pipe.prediction_type == "v_prediction"
    v_img = v_pipe("a red cat", height=32, width=32, num_inference_steps=3, output_type="latent", latents=_noise(0)).images
    assert torch.isfinite(v_img).all() and not torch.allclose(v_img, eps_img, atol=1e-3)
    # one step by hand: x0 = sqrt(ᾱ)·x − sqrt(1 − ᾱ)·v̂ with the guided v̂ of two explicit calls
    te, lat = v_pipe.text_encoder, _noise(1)
    got = v_pipe("a red cat", num_inference_steps=1, output_type="latent", latents=lat).images
    cond, uncond = te.encode(["a red cat"], te.max_length), te.encode([""], te.max_length)
    assert _close(got, _one_step_reference(v_pipe, lat, cond, uncond, prediction="v_prediction"))
    assert not _close(got, _one_step_reference(v_pipe, lat, cond, uncond), rel=1e-2)


# ---------------------------------------------------------------------------------------------
# CLI flags: --ar, --dtype, a transformer-only --model, Ctrl-C
# ---------------------------------------------------------------------------------------------


def test_cli_aspect_ratio_flag(folder, tmp_path, capsys):
    """--ar H:W (official syntax: 1:2 is landscape) gives the ratio's bin of the 32 px model; with
    --size it is refused, and a malformed ratio is one line, exit 2."""
    out = tmp_path / "ar.png"
    assert cli.main(["generate", "a cat", "--model", str(folder), "-o", str(out), "--steps", "1", "--ar", "1:2"]) == 0
    params = read_png_params(out)
    w, h = (int(v) for v in params["size"].split("x"))
    gw, gh = (int(v) for v in params["generated_size"].split("x"))
    assert h / w == pytest.approx(0.5, rel=0.05) and h * w == pytest.approx(32 * 32, rel=0.1)
    assert (gh, gw) in aspect_ratio_bins(32, 4).values() and gh < gw  # the nearest bin of the tiny model
    capsys.readouterr()
    for extra in (["--ar", "1:2", "--size", "32x32"], ["--ar", "wide"], ["--ar", "0:1"], ["-n", "0"]):
        assert cli.main(["generate", "a cat", "--model", str(folder), "-o", str(tmp_path / "bad.png"), *extra]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize("dtype,weights,text", [("bf16", torch.bfloat16, torch.bfloat16),
                                                ("fp16", torch.float16, torch.bfloat16)])
def test_cli_dtype_flag_runs_the_transformer_in_that_dtype(folder, tmp_path, monkeypatch, dtype, weights, text):
    """--dtype sets the transformer's weights (the text encoder runs bf16 for fp16: T5 overflows in
    fp16); the image is close to fp32's and records the dtype."""
    seen = {}
    denoise = SigmaPipeline._denoise

    def spy(self, *a, **k):
        seen["weights"] = self.transformer.x_embedder.proj.weight.dtype
        seen["text"] = self.text_encoder.dtype
        return denoise(self, *a, **k)

    monkeypatch.setattr(SigmaPipeline, "_denoise", spy)
    base = ["generate", "a red cat", "--model", str(folder), "--steps", "2", "--seed", "1", "--cfg", "1"]
    assert cli.main(base + ["-o", str(tmp_path / "lo.png"), "--dtype", dtype]) == 0
    assert seen == {"weights": weights, "text": text}
    assert read_png_params(tmp_path / "lo.png")["dtype"] == dtype
    assert cli.main(base + ["-o", str(tmp_path / "hi.png")]) == 0
    assert seen["weights"] == torch.float32
    from PIL import Image

    lo, hi = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(float) for n in ("lo", "hi"))
    assert np.abs(lo - hi).mean() < 0.1 * 255
    assert cli.main(base + ["-o", str(tmp_path / "bad.png"), "--dtype", "fp8"]) == 2


@pytest.mark.skipif(not (Path(cli.__file__).parent / "assets" / "default_model" / "transformer").is_dir(),
                    reason="no shipped default model in this checkout")
def test_cli_transformer_only_model_uses_the_shipped_text_encoder_and_vae(folder, tmp_path, capsys):
    """--model naming a transformer file alone: text encoder and VAE come from the shipped model, so
    the shipped model's own weights under another name give the shipped model's image."""
    from PIL import Image

    from pixsigma.pipeline import default_model_dir

    weights = tmp_path / "mine.safetensors"
    shutil.copy(default_model_dir() / "transformer" / "model.safetensors", weights)
    base = ["generate", "a red circle at the top left", "--steps", "2", "--seed", "4"]
    assert cli.main(base + ["-o", str(tmp_path / "default.png")]) == 0
    assert cli.main(base + ["--model", str(weights), "-o", str(tmp_path / "mine.png")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("default", "mine"))
    assert np.array_equal(a, b)
    hashes = [read_png_params(tmp_path / f"{n}.png")["model_hash"] for n in ("default", "mine")]
    assert hashes[0] == hashes[1]
    # a transformer made for another text encoder: one line naming the mismatch, not "damaged"
    save_transformer(build_transformer(), tmp_path / "tiny.safetensors")
    capsys.readouterr()
    assert cli.main(base + ["--model", str(tmp_path / "tiny.safetensors"), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "caption channels" in err and "damaged" not in err and len(err.strip().splitlines()) == 1


def test_cli_ctrl_c_exits_130_and_leaves_no_partial_file(folder, tmp_path, monkeypatch, capsys):
    """Ctrl-C during the second prompt's denoising: exit 130, the first prompt's images complete,
    nothing (not even a temporary file) for the second."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue house\n")
    calls = []
    denoise = SigmaPipeline._denoise

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:  # the second prompt's first image
            raise KeyboardInterrupt
        return denoise(self, *a, **k)

    monkeypatch.setattr(SigmaPipeline, "_denoise", interrupted)
    out = tmp_path / "run" / "img.png"
    code = cli.main(["generate", "--prompts-file", str(prompts), "--model", str(folder), "-o", str(out), "-n", "2",
                     "--steps", "1"])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in out.parent.iterdir()) == ["img-000.png", "img-001.png"]
    assert all(read_png_params(out.parent / n)["prompt"] == "a red cat" for n in ("img-000.png", "img-001.png"))
