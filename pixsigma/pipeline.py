"""Text-to-image generation: `SigmaPipeline` (text encoder → transformer + sampler → VAE).

    pipe = SigmaPipeline.from_pretrained("pixart_sigma_folder")      # diffusers folder layout
    image = pipe("a small cactus with a happy face", seed=0).images[0]

The folder follows diffusers' layout: text_encoder/, tokenizer/, vae/, transformer/ and an
optional scheduler/. `transformer=` may name an official .pth or this project's .safetensors
instead of the folder's transformer. `folder=None` loads the project's shipped default model
(`pixsigma/assets/default_model/`, same layout; without text_encoder/ it uses the packaged
MiniLM, see `pixsigma.text.minilm_path`).

Classifier-free guidance batches the unconditional (negative prompt, with its own mask, as in
diffusers) and conditional passes into one forward; the caption's cross-attention keys/values
are computed once per call. Requests are generated at the nearest aspect-ratio bin of the
model's resolution and resized + center-cropped to the exact size asked for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pixsigma.diffusion.cache import StepCache, as_cache_config, with_step_cache
from pixsigma.diffusion.samplers import default_steps, is_lcm_model, randn, resolve_sampler, sample
from pixsigma.errors import PixsigmaError
from pixsigma.io import as_dtype, weights_hash
from pixsigma.model.transformer import onednn_linears
from pixsigma.resolution import check_side, parse_prompt_options, plan_size, resize_and_crop, size_for_ratio
from pixsigma.text import TextEncoder, minilm_path
from pixsigma.vae import VAE

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default_model"
LAYOUT = "text_encoder/, tokenizer/, vae/, transformer/ (scheduler/ optional)"
LCM_LORA_KEY = "pixsigma_lcm"  # a LoRA file's metadata key: the LCM distillation that made it (JSON)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class SigmaOutput:
    """Generated images (list of PIL images, (B, H, W, 3) float numpy in [0, 1], (B, 3, H, W)
    tensor, or latents) plus what was done: sizes, steps, sampler, timings in seconds."""

    images: object
    info: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def guided_model_fn(transformer, context, guidance_scale: float | None, channels: int,
                    guidance_interval: tuple[float, float] | None = None):
    """The denoiser a sampler calls: one transformer forward per step. With guidance, the
    context holds [unconditional; conditional] captions and the latents are doubled, so both
    passes run as one batch; epsilon is guided, the learned variance taken from the conditional
    pass. guidance_interval = (t_min, t_max): guide only at timesteps in that closed range and
    run the conditional pass alone elsewhere (guidance in a limited interval, Kynkäänniemi et al.
    2024)."""
    cond_context = None
    if guidance_scale is not None and guidance_interval is not None:
        from pixsigma.model.transformer import CaptionContext

        n = context.kv[0][0].shape[0] // 2
        cond_context = CaptionContext(kv=[(k[n:], v[n:]) for k, v in context.kv],
                                      mask=None if context.mask is None else context.mask[n:])

    def model_fn(x, t):
        guided = guidance_scale is not None and (
            guidance_interval is None or guidance_interval[0] <= float(t) <= guidance_interval[1])
        x_in = torch.cat([x, x]) if guided else x
        t_in = torch.as_tensor(t, device=x.device).reshape(-1).expand(x_in.shape[0])
        if not guided:
            return transformer(x_in, t_in, context if cond_context is None else cond_context).float()
        out = transformer(x_in, t_in, context).float()
        uncond, cond = out.chunk(2)
        eps = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
        return torch.cat([eps, cond[:, channels:]], dim=1)

    return model_fn


def check_guidance_scale(scale) -> float:
    """The classifier-free guidance scale as a float; a clear error unless it is a finite number >= 0."""
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise PixsigmaError(f"guidance scale {scale!r} is not a number") from None
    if not np.isfinite(scale) or scale < 0:
        raise PixsigmaError(f"guidance scale {scale} must be a finite number >= 0")
    return scale


def check_guidance_interval(interval) -> tuple[float, float] | None:
    """(t_min, t_max) as floats from a pair or a "T_MIN,T_MAX" string (the CLI's), or None; a
    clear error for anything else."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in (interval.split(",") if isinstance(interval, str) else interval))
    except (TypeError, ValueError):
        raise PixsigmaError(f"guidance interval {interval!r}: expected two timesteps T_MIN,T_MAX, e.g. 500,999") from None
    if not (0 <= lo <= hi and np.isfinite(hi)):
        raise PixsigmaError(f"guidance interval {interval!r}: expected 0 <= t_min <= t_max (timesteps, 0..999)")
    return lo, hi


def compile_transformer(transformer):
    """The transformer under torch.compile (inductor) for inference.

    Inductor fuses the elementwise work between the matmuls (adaLN modulation, GELU, gates, the
    fp32-residual casts), a sizeable part of a CPU forward, and with `freezing` treats the
    weights as constants so the matmuls get pre-packed layouts (benchmarks/generate_1024.py
    measures the gain). It compiles on the first call and again for each new latent size; the
    weights are read at compile time, so weights changed afterwards need a new compile. Needs a
    C++ compiler on CPU.
    """
    return torch.compile(transformer, dynamic=False, options={"freezing": True})


def default_model_dir() -> Path:
    return DEFAULT_MODEL_DIR


def _load_transformer_from(path: Path, dtype, overrides: dict | None = None):
    from pixsigma.model.checkpoint import load_transformer

    if path.is_dir() and not (path / "config.json").is_file():
        files = sorted([*path.glob("*.safetensors"), *path.glob("*.pth")])
        if len(files) == 1:
            path = files[0]
        else:
            raise PixsigmaError(f"{path}: expected a diffusers transformer folder (config.json + diffusion_pytorch_model.safetensors) "
                                "or exactly one .safetensors/.pth file")
    return load_transformer(path, dtype=dtype, **(overrides or {}))


def is_lcm_lora(path) -> bool:
    """Whether a LoRA file records that it is an LCM-LoRA (`LCM_LORA_KEY` in its metadata)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return LCM_LORA_KEY in (f.metadata() or {})


def _variant_path(folder: Path, variant: str, transformer) -> Path:
    """The transformer of a folder's variant: `folder/transformer_<variant>/`."""
    if transformer is not None:
        raise PixsigmaError("give either transformer= or variant=, not both")
    path = folder / f"transformer_{variant}"
    if not path.is_dir():
        have = sorted(p.name[len("transformer_"):] for p in folder.glob("transformer_*") if p.is_dir())
        raise PixsigmaError(f"{folder}: no variant {variant!r} (no {path.name}/); expected one of {have or 'none'}")
    return path


def _check_layout(folder: Path, transformer) -> bool:
    """Check that `folder` holds a pipeline (vae/, transformer/ unless one is given, text_encoder/
    beside a tokenizer/); whether it has its own text encoder."""
    if not folder.is_dir():
        raise PixsigmaError(f"{folder}: model folder does not exist; expected a pipeline folder with {LAYOUT}")
    missing = [n for n in ("vae",) if not (folder / n).is_dir()]
    if transformer is None and not (folder / "transformer").is_dir():
        missing.append("transformer")
    has_text = (folder / "text_encoder").is_dir()
    if not has_text and (folder / "tokenizer").is_dir():
        missing.append("text_encoder")
    if missing:
        raise PixsigmaError(f"{folder}: missing {', '.join(m + '/' for m in missing)}; expected a pipeline folder with {LAYOUT}")
    return has_text


def _load_model(folder: Path, transformer, device, dtype, overrides: dict | None):
    """The transformer (a given module, a given path, else the folder's) on device in dtype, and
    the pipeline's name (the folder's, or the checkpoint file's stem)."""
    from pixsigma.model.transformer import PixArtSigmaTransformer

    from pixsigma.model.quantize import load_quantized, quantized_file

    if isinstance(transformer, PixArtSigmaTransformer):
        if getattr(transformer, "quantization", None):  # quantized weights keep their own dtypes
            return transformer.to(device=device).eval(), folder.name
        return transformer.to(device=device, dtype=dtype).eval(), folder.name
    src = Path(transformer) if transformer is not None else folder / "transformer"
    qfile = quantized_file(src)
    if qfile is not None:  # a quantized checkpoint loads as stored, never re-quantized
        return load_quantized(qfile, device=device), src.stem if transformer is not None else folder.name
    model = _load_transformer_from(src, dtype, overrides).to(device)
    return model, src.stem if transformer is not None else folder.name


def _load_text_encoder(folder: Path, has_text: bool, model, device, dtype, clean: bool, lowercase: bool, cache_dir,
                       max_length: int | None) -> TextEncoder:
    """The folder's text encoder (else the packaged MiniLM), captions padded to `max_length` (default
    the transformer's caption tokens, capped at what the encoder supports)."""
    if has_text:
        enc_path = folder / "text_encoder"
        tok_path = folder / "tokenizer" if (folder / "tokenizer").is_dir() else enc_path
    else:
        enc_path = tok_path = minilm_path()
        log.info("%s has no text_encoder/: using the packaged MiniLM text encoder (%s)", folder, enc_path)
    max_len = max_length or model.config.max_caption_tokens
    text = TextEncoder(enc_path, tok_path, max_length=None, dtype=dtype, device=device, clean=clean,
                       lowercase=lowercase, cache_dir=cache_dir)
    limit = text._token_limit()
    if limit is not None and max_len > limit:
        log.warning("caption length %d exceeds the text encoder's %d positions: using %d", max_len, limit, limit)
        max_len = limit
    text.max_length = max_len
    if model.config.caption_channels != text.hidden_size and not has_text:
        raise PixsigmaError(
            f"the transformer expects {model.config.caption_channels} caption channels but the packaged MiniLM text encoder "
            f"(used as {folder.name}/ has no text_encoder/) gives {text.hidden_size}; expected a transformer trained on "
            "MiniLM captions, or a pipeline folder whose text_encoder/ matches the transformer"
        )
    return text


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PixsigmaError(f"{path}: not valid JSON ({e})") from None


class SigmaPipeline:
    def __init__(self, transformer, text_encoder: TextEncoder, vae: VAE, scheduler_config: dict | None = None,
                 device="cpu", name: str = "pixsigma", null_caption_uncond: bool = False,
                 guidance_interval: tuple[float, float] | None = None, lcm: bool = False):
        if transformer.config.caption_channels != text_encoder.hidden_size:
            raise PixsigmaError(
                f"the transformer expects {transformer.config.caption_channels} caption channels but the text encoder "
                f"{text_encoder.path.name} gives {text_encoder.hidden_size}; expected them to match"
            )
        if transformer.config.in_channels != vae.latent_channels:
            raise PixsigmaError(f"the transformer takes {transformer.config.in_channels} latent channels but the VAE has "
                                f"{vae.latent_channels}; expected them to match")
        self.transformer = transformer.eval()
        self.text_encoder = text_encoder
        self.vae = vae
        self.scheduler_config = scheduler_config
        self.device = torch.device(device)
        self.name = name
        # Unconditional branch for an empty negative prompt: the text embedding of "" (diffusers,
        # the default) or the model's null caption (the official sampler; set by a folder's
        # model_index.json "pixsigma_unconditional": "null_caption").
        self.null_caption_uncond = null_caption_uncond
        # where guidance applies when a call names no interval (model_index.json
        # "pixsigma_guidance_interval"; None: every step)
        self.guidance_interval = check_guidance_interval(guidance_interval)
        # A latent consistency model (recorded by its checkpoint or folder, or lcm=True) samples
        # with "lcm" and no classifier-free guidance unless a call asks otherwise.
        self.lcm = bool(lcm) or is_lcm_model(getattr(transformer, "history", ()), scheduler_config=scheduler_config)
        self._hash = None
        self._compiled = None  # set by enable_compile()
        self.controlnet = None  # a ControlNetTransformer on self.transformer, set by set_controlnet()
        self.feedback = None  # an ILF FeedbackTransformer on self.transformer, set by load_feedback()
        # float32 transformers on CPU multiply through oneDNN on weights reordered once per call
        # (model.transformer.onednn_linears: faster where torch's BLAS is slow, e.g. AMD CPUs; the
        # copies live only during a call). False: plain F.linear.
        self.onednn_linear = True

    def set_controlnet(self, controlnet) -> "SigmaPipeline":
        """Attach a ControlNet (a ControlNetTransformer, or a path `load_controlnet` reads) to this
        pipeline's transformer; calls with `control_image=` then use it."""
        from pixsigma.model.controlnet import ControlNetTransformer
        from pixsigma.model.controlnet_checkpoint import load_controlnet

        if not isinstance(controlnet, ControlNetTransformer):
            dtype = self.transformer.x_embedder.proj.weight.dtype
            controlnet = load_controlnet(controlnet, base=self.transformer, device=self.device, dtype=dtype)
        elif controlnet.base_model is not self.transformer:
            raise PixsigmaError("the ControlNet is built on another transformer than this pipeline's; expected "
                                "ControlNetTransformer.from_transformer(pipe.transformer) or a checkpoint path")
        self.controlnet = controlnet.eval()
        return self

    def load_feedback(self, path) -> "SigmaPipeline":
        """Attach an Inner Loop Feedback module (a file from `pixsigma distill ilf`, or a
        FeedbackTransformer on this pipeline's transformer); None detaches it. The file must name
        this transformer as its base."""
        from pixsigma.model.feedback import FeedbackTransformer, load_feedback

        if path is None or isinstance(path, FeedbackTransformer):
            if path is not None and path.base_model is not self.transformer:
                raise PixsigmaError("the feedback module is built on another transformer than this pipeline's")
            self.feedback = path
            return self
        self.feedback = load_feedback(path, self.transformer)
        return self

    def enable_compile(self) -> "SigmaPipeline":
        """Run the transformer under torch.compile from the next call on (see compile_transformer)."""
        self._compiled = compile_transformer(self.transformer)
        return self

    # -- LoRA (diffusers' method names; pixsigma.model.lora does the work) --------------------------
    def load_lora_weights(self, path, adapter_name: str | None = None, scale: float = 1.0) -> str:
        """Attach a LoRA file or PEFT folder as a new adapter, active beside the others; its name.
        An LCM-LoRA (its file records LCM distillation) makes the pipeline an LCM one (sampler
        "lcm", no guidance by default)."""
        from pixsigma.model import lora

        name = lora.load_lora(self.transformer, path, scale=scale, adapter_name=adapter_name)
        self.lcm = self.lcm or is_lcm_lora(path)
        self._lora_changed()
        return name

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """Activate these adapters with these weights (default 1 each)."""
        from pixsigma.model import lora

        lora.set_adapters(self.transformer, adapter_names, adapter_weights)
        self._lora_changed()

    def fuse_lora(self, lora_scale: float = 1.0) -> None:
        """Merge the active adapters into the weights (no per-step cost); unfuse_lora undoes it."""
        from pixsigma.model import lora

        lora.fuse_lora(self.transformer, lora_scale)
        self._lora_changed()

    def unfuse_lora(self) -> None:
        from pixsigma.model import lora

        lora.unfuse_lora(self.transformer)
        self._lora_changed()

    def unload_lora_weights(self) -> None:
        """Remove every adapter (fused ones stay merged in the weights, as in diffusers)."""
        from pixsigma.model import lora

        lora.unload_lora(self.transformer)
        self._lora_changed()

    def _lora_changed(self) -> None:
        self._hash = None  # the weights hash names the model with its adapters
        if self._compiled is not None:
            self.enable_compile()  # a compiled graph holds the weights it was compiled with

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder=None, transformer=None, variant: str | None = None, **kwargs):
        """Load a pipeline folder (diffusers layout) or, with folder=None, the shipped default model
        (see `_from_folder` for the options). variant: a second transformer of the folder,
        `transformer_<variant>/` (e.g. "lcm", the default model's latent consistency model)."""
        for key in ("dtype", "text_dtype", "vae_dtype"):  # bad arguments are the caller's, not the model's
            if kwargs.get(key) is not None:
                kwargs[key] = as_dtype(kwargs[key])
        if variant is not None:
            transformer = _variant_path(Path(folder) if folder is not None else DEFAULT_MODEL_DIR, variant, transformer)
        if folder is not None:
            pipe = cls._from_folder(folder, transformer, **kwargs)
            if variant is not None:
                pipe.name = f"{Path(folder).name}-{variant}"
            return pipe
        try:
            pipe = cls._from_folder(DEFAULT_MODEL_DIR, transformer, **kwargs)
        except PixsigmaError as e:
            if str(DEFAULT_MODEL_DIR) not in str(e):  # about a given transformer, not the shipped files
                raise
            raise PixsigmaError(
                f"{e} -- the shipped default model is missing or damaged; restore it with "
                "`git checkout -- pixsigma/assets/default_model` (or reinstall pixsigma), or rebuild it with "
                "`bash scripts/train_default_model.sh`") from None
        pipe.name = "default" if variant is None else f"default-{variant}"
        return pipe

    @classmethod
    def _from_folder(cls, folder, transformer=None, device="cpu", dtype=torch.float32, text_dtype=None,
                     vae_dtype=None, clean_caption: bool = False, lowercase: bool = False, cache_dir=None,
                     max_sequence_length: int | None = None, transformer_overrides: dict | None = None,
                     controlnet=None, quantize: str | None = None, text_encoder_quantize: str | None = None,
                     calibration_prompts: list[str] | None = None, feedback=None):
        """Load a pipeline folder (diffusers layout).

        feedback: an ILF feedback file for the transformer (see `load_feedback`).

        quantize: "int8" | "int4" | "svdquant" for the transformer, text_encoder_quantize: "int8" |
        "int4" for the text encoder (see `pixsigma.model.quantize`; svdquant calibrates on
        `calibration_prompts`, default a few prompts of the shipped model's domain).

        controlnet: a ControlNet checkpoint for the transformer (see `set_controlnet`).

        transformer: a path (official .pth, pixsigma .safetensors, diffusers transformer folder) or
        a PixArtSigmaTransformer replacing the folder's. dtype: the transformer's (fp32/bf16/fp16);
        the text encoder follows it (bf16 instead of fp16: T5 overflows in fp16), the VAE is fp32
        unless dtype is bf16. transformer_overrides: what an official .pth cannot tell
        (sample_size, pe_interpolation, num_heads), passed to `load_transformer`.
        """
        dtype = as_dtype(dtype)
        folder = Path(folder)
        from pixsigma.model.quantize import check_quantize_args, quantize_text_encoder

        check_quantize_args(quantize, text_encoder_quantize, device)
        has_text = _check_layout(folder, transformer)
        device = torch.device(device)
        model, name = _load_model(folder, transformer, device, dtype, transformer_overrides)
        if text_dtype is None:
            text_dtype = torch.bfloat16 if dtype == torch.float16 else dtype
        text = _load_text_encoder(folder, has_text, model, device, as_dtype(text_dtype), clean=clean_caption,
                                  lowercase=lowercase, cache_dir=cache_dir, max_length=max_sequence_length)
        if vae_dtype is None:
            vae_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        vae = VAE(folder / "vae", device=device, dtype=as_dtype(vae_dtype))
        sched_file = folder / "scheduler" / "scheduler_config.json"
        scheduler_config = _read_json(sched_file) if sched_file.is_file() else None
        index_file = folder / "model_index.json"
        index = _read_json(index_file) if index_file.is_file() else {}
        pipe = cls(model, text, vae, scheduler_config, device=device, name=name,
                   null_caption_uncond=index.get("pixsigma_unconditional") == "null_caption",
                   guidance_interval=index.get("pixsigma_guidance_interval"), lcm=is_lcm_model(index=index))
        if text_encoder_quantize is not None:
            quantize_text_encoder(text.model, text_encoder_quantize)
        if quantize is not None:
            pipe.quantize(quantize, calibration_prompts)
        if feedback is not None:
            pipe.load_feedback(feedback)
        return pipe.set_controlnet(controlnet) if controlnet is not None else pipe

    def quantize(self, mode: str, calibration_prompts: list[str] | None = None) -> "SigmaPipeline":
        """Quantize the transformer in place ("int8" | "int4" | "svdquant"); svdquant's smoothing is
        calibrated by generating `calibration_prompts` (default: prompts of the shipped model's
        domain) with the float model first."""
        from pixsigma.model.quantize import CALIBRATION_PROMPTS, CALIBRATION_STEPS, quantize_transformer

        prompts = list(calibration_prompts or CALIBRATION_PROMPTS)
        run = lambda: self(prompts, num_inference_steps=CALIBRATION_STEPS, output_type="latent", seed=0)  # noqa: E731
        self.transformer = quantize_transformer(self.transformer, mode, calibrate=run if mode == "svdquant" else None)
        self._hash, self._compiled = None, None
        return self

    # -- facts -----------------------------------------------------------------------------------
    @property
    def default_sampler(self) -> str:
        return "lcm" if self.lcm else "dpm-solver"

    @property
    def default_guidance_scale(self) -> float:
        return 1.0 if self.lcm else 4.5

    @property
    def prediction_type(self) -> str | None:
        """What the transformer predicts: its own config's value when it records one other than the
        default (a pixsigma checkpoint), else None (the scheduler config decides, as in diffusers)."""
        kind = self.transformer.config.prediction_type
        return kind if kind != "epsilon" else None

    @property
    def resolution(self) -> int:
        """The model's base pixel size (training latent size × VAE factor)."""
        return self.transformer.config.sample_size * self.vae.factor

    @property
    def patch_pixels(self) -> int:
        return self.transformer.config.patch_size * self.vae.factor

    def weights_hash(self) -> str:
        """A short (12 hex) SHA-256 over the transformer's weights, to tell models apart."""
        if self._hash is None:
            from pixsigma.model.quantize import plain_state_dict  # quantized weights hash as their stored tensors

            self._hash = weights_hash(plain_state_dict(self.transformer))
        return self._hash

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt, negative_prompt="", num_inference_steps: int | None = None,
                 guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1, generator=None,
                 latents: torch.Tensor | None = None, sampler: str | None = None, output_type: str = "pil",
                 use_resolution_binning: bool = True, callback=None, max_sequence_length: int | None = None,
                 seed: int | None = None, progress: bool = False,
                 guidance_interval: tuple[float, float] | None = None, control_image=None, control_type: str = "none",
                 controlnet_conditioning_scale: float = 1.0, control_guidance_start: float = 0.0,
                 control_guidance_end: float = 1.0, step_cache=None) -> SigmaOutput:
        """Generate images. prompt: str or list (may be ""; inline "--ar h:w" / "--hw h:w" honored);
        negative_prompt: str or list (the unconditional branch); num_inference_steps: default
        per sampler (dpm-solver 20, sa-solver 25, iddpm 100, lcm 4); guidance_scale and sampler:
        default 4.5 and dpm-solver, or 1 (no guidance) and lcm for an LCM model; generator: a torch.Generator, or a
        list with one per image (image k of the batch is then exactly the single-image call with
        generator k, for every sampler); seed: shortcut for a CPU generator; latents: initial
        standard normal noise (B, C, h, w) at the generation size; output_type: pil | np | pt |
        latent; guidance_interval: (t_min, t_max), guide only at timesteps in that range (0..999),
        run the conditional pass alone elsewhere; None: the pipeline's default (every step unless
        the model folder names an interval); (0, 999) guides every step. control_image (with a
        ControlNet loaded): a path, PIL image or array, preprocessed by control_type (none | canny |
        mask) and resized + center-cropped to the generation size like the output; its residuals
        are scaled by controlnet_conditioning_scale and applied on the steps whose fraction of the
        run lies in [control_guidance_start, control_guidance_end]. step_cache: training-free step
        caching, "fora" | "delta" | a dict of StepCacheConfig's fields | a StepCacheConfig
        (pixsigma.diffusion.cache); None runs every block at every step."""
        req = self._check_inputs(prompt, negative_prompt, num_inference_steps, guidance_scale, height, width,
                                 num_images_per_prompt, sampler, output_type, use_resolution_binning,
                                 max_sequence_length, guidance_interval)
        req.step_cache = as_cache_config(step_cache)
        if seed is not None and generator is None:
            generator = torch.Generator("cpu").manual_seed(int(seed))
        noise = self._prepare_latents(req, latents, generator)
        timings = {}
        t0 = time.perf_counter()
        with self._linears():
            context = self._encode_prompts(req)
            timings["text"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            control = self._prepare_control(req, control_image, control_type, controlnet_conditioning_scale,
                                            control_guidance_start, control_guidance_end)
            x = self._denoise(req, context, noise, generator, callback, progress, control)
        timings["denoise"] = time.perf_counter() - t0
        if output_type == "latent":
            return SigmaOutput(images=x, info=req.info(), timings=timings)
        t0 = time.perf_counter()
        images = self._decode(req, x)
        timings["decode"] = time.perf_counter() - t0
        return SigmaOutput(images=_to_output(images, output_type), info=req.info(), timings=timings)

    def _linears(self):
        """The oneDNN fast path over this call's transformer (and its ControlNet copies or feedback
        block), when on; nothing otherwise."""
        if not self.onednn_linear or self.device.type != "cpu" or self._compiled is not None:
            return contextlib.nullcontext()
        return onednn_linears(self.transformer, self.controlnet, self.feedback)

    def _check_inputs(self, prompt, negative_prompt, steps, guidance_scale, height, width, num_images_per_prompt,
                      sampler, output_type, use_resolution_binning, max_sequence_length, guidance_interval) -> "_Request":
        """Every argument checked (a PixsigmaError naming the bad one) and the sizes planned."""
        sampler = resolve_sampler(sampler if sampler is not None else self.default_sampler)
        steps = int(steps) if steps is not None else default_steps(sampler)
        if output_type not in OUTPUT_TYPES:
            raise PixsigmaError(f"unknown output_type {output_type!r}; expected one of {OUTPUT_TYPES}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise PixsigmaError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        guidance_scale = check_guidance_scale(guidance_scale if guidance_scale is not None else self.default_guidance_scale)
        interval = check_guidance_interval(guidance_interval) if guidance_interval is not None else self.guidance_interval
        prompts, options = _parse_prompts(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise PixsigmaError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; expected one string or one per prompt")
        req_h, req_w = self._request_size(height, width, options)
        gen_h, gen_w = plan_size(req_h, req_w, self.resolution, self.patch_pixels, use_resolution_binning)
        f, c = self.vae.factor, self.transformer.config.in_channels
        n = len(prompts) * num_images_per_prompt
        log.debug("generating %d image(s) at %dx%d (requested %dx%d)", n, gen_w, gen_h, req_w, req_h)
        return _Request(prompts=prompts, negatives=negatives, per_prompt=num_images_per_prompt, sampler=sampler,
                        steps=steps, guidance_scale=guidance_scale, guidance_interval=interval,
                        max_length=max_sequence_length or self.text_encoder.max_length,
                        height=req_h, width=req_w, generated_height=gen_h, generated_width=gen_w,
                        latent_shape=(n, c, gen_h // f, gen_w // f))

    def _request_size(self, height, width, options: dict) -> tuple[int, int]:
        if height is not None or width is not None:
            res = self.resolution
            return check_side(height if height is not None else res, "height"), check_side(width if width is not None else res, "width")
        if "hw" in options:
            return options["hw"]
        if "ar" in options:
            return size_for_ratio(options["ar"], self.resolution)
        return self.resolution, self.resolution

    def _prepare_latents(self, req: "_Request", latents, generator) -> torch.Tensor:
        """The initial standard-normal latents: `latents` as given (shape checked), else drawn from
        `generator` (one per image for a list; see diffusion.samplers.randn)."""
        shape = req.latent_shape
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise PixsigmaError(f"latents of shape {tuple(latents.shape)}; expected {shape} for "
                                    f"{req.generated_height}x{req.generated_width} pixels")
            return latents.to(self.device, torch.float32)
        return randn(shape, generator, device=self.device, draw_device="cpu")

    def _encode_prompts(self, req: "_Request"):
        """The caption context: prompt embeddings, with guidance preceded by the unconditional ones
        ([uncond; cond]), each repeated per image, projected once by the transformer."""
        emb, mask = self.text_encoder.encode(req.prompts, req.max_length)
        if req.guided:
            neg_emb, neg_mask = self.text_encoder.encode(req.negatives, req.max_length)
            if self.null_caption_uncond:
                # The official sampler's unconditional branch: the null caption the model was
                # trained to read as "no caption" (with the prompt's mask), for empty negatives.
                null = self.transformer.y_embedder.y_embedding[:req.max_length].to(neg_emb.device, neg_emb.dtype)
                empty = torch.tensor([n == "" for n in req.negatives], device=neg_emb.device)
                neg_emb = torch.where(empty[:, None, None], null[None], neg_emb)
                neg_mask = torch.where(empty[:, None], mask, neg_mask)
            emb, mask = torch.cat([neg_emb, emb]), torch.cat([neg_mask, mask])
        if req.per_prompt > 1:
            emb = emb.repeat_interleave(req.per_prompt, dim=0)
            mask = mask.repeat_interleave(req.per_prompt, dim=0)
        wdtype = self.transformer.x_embedder.proj.weight.dtype
        encoder = self.controlnet if self.controlnet is not None else self.transformer  # + the copies' K/V
        if self.feedback is not None and self.controlnet is None:
            encoder = self.feedback  # + the feedback block's K/V
        return encoder.prepare_caption(emb.to(self.device, wdtype), mask.to(self.device))

    def _prepare_control(self, req: "_Request", image, kind: str, scale, start: float, end: float):
        """The ControlNet denoiser for a control image (None without one): the image preprocessed,
        fitted to the generation size and VAE-encoded, the steps it applies on chosen."""
        if image is None:
            return None
        if self.controlnet is None:
            raise PixsigmaError("a control image was given but the pipeline has no ControlNet; expected "
                                "from_pretrained(..., controlnet=PATH) or pipe.set_controlnet(PATH)")
        from pixsigma.data.control import control_tensor
        from pixsigma.model.controlnet import ControlledDenoiser, check_control_scale, control_steps

        active = control_steps(req.steps, start, end)
        pixels = control_tensor(image, req.generated_height, req.generated_width, kind)  # (1, 3, H, W)
        latent = self.vae.encode(pixels).to(self.device)  # (1, C, H/f, W/f)
        return ControlledDenoiser(self.controlnet, latent, check_control_scale(scale), active)

    def _denoise(self, req: "_Request", context, noise, generator, callback, progress, control=None) -> torch.Tensor:
        """The sampler run from `noise` with the guided denoiser (the ControlNet's `control`, when
        given); clean latents."""
        denoiser = self._compiled if self._compiled is not None else self.transformer
        denoiser = control if control is not None else denoiser
        if self.feedback is not None:
            if control is not None or req.step_cache is not None or self.controlnet is not None:
                raise PixsigmaError("an ILF feedback module does not combine with a ControlNet or step caching; expected one of them")
            denoiser = self.feedback
        if req.step_cache is not None:  # the plain module: the cache steers its block loop
            if control is not None:
                raise PixsigmaError("step caching does not combine with a control image; expected one or the other")
            denoiser = with_step_cache(self.transformer, StepCache(req.step_cache, self.transformer.config.depth))
        model_fn = guided_model_fn(denoiser, context, req.guidance_scale if req.guided else None,
                                   noise.shape[1], req.guidance_interval)
        try:
            return sample(model_fn, noise, sampler=req.sampler, steps=req.steps, generator=generator, callback=callback,
                          scheduler_config=self.scheduler_config, progress=progress, prediction_type=self.prediction_type)
        except torch._dynamo.exc.TorchDynamoException as e:
            first = " ".join(str(e).split())[:160]
            raise PixsigmaError(f"torch.compile could not compile the transformer ({type(e).__name__}: {first}); "
                                "expected a working C++ compiler (g++/clang) for inductor on CPU, or run without compile") from None

    def _decode(self, req: "_Request", x: torch.Tensor) -> torch.Tensor:
        """Latents to (B, 3, H, W) images in [0, 1] at the requested size (resized and center-cropped
        from the generated size when they differ)."""
        images = self.vae.decode(x)
        if images.shape[-2:] != (req.height, req.width):
            images = resize_and_crop(images, req.height, req.width).clamp_(0, 1)
        return images


@dataclass
class _Request:
    """One call's checked arguments and planned sizes."""

    prompts: list[str]
    negatives: list[str]
    per_prompt: int
    sampler: str
    steps: int
    guidance_scale: float
    guidance_interval: tuple[float, float] | None
    max_length: int
    height: int
    width: int
    generated_height: int
    generated_width: int
    latent_shape: tuple[int, int, int, int]
    step_cache: object = None  # a StepCacheConfig, or None

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def info(self) -> dict:
        info = {"height": self.height, "width": self.width, "generated_height": self.generated_height,
                "generated_width": self.generated_width, "steps": self.steps, "sampler": self.sampler,
                "guidance_scale": self.guidance_scale, "prompts": self.prompts, "negative_prompts": self.negatives}
        if self.guidance_interval is not None:
            info["guidance_interval"] = list(self.guidance_interval)
        if self.step_cache is not None:
            info["step_cache"] = {"mode": self.step_cache.mode, "interval": self.step_cache.interval}
        return info


def _parse_prompts(prompt) -> tuple[list[str], dict]:
    """Prompts as a list with their inline size options ("--ar", "--hw") taken out; the options
    must agree (one size per call)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise PixsigmaError("prompt must be a string or a non-empty list of strings")
    parsed = [parse_prompt_options(p) for p in prompts]
    options = [o for _, o in parsed]
    if any(o != options[0] for o in options):
        raise PixsigmaError("prompts of one call ask for different sizes (--ar/--hw); expected one size per call")
    return [p for p, _ in parsed], options[0]


def _to_output(images: torch.Tensor, output_type: str):
    """(B, 3, H, W) images in [0, 1] as output_type: the tensor ("pt"), (B, H, W, 3) float numpy
    ("np") or PIL images rounded to 8 bits ("pil")."""
    if output_type == "pt":
        return images
    arr = images.permute(0, 2, 3, 1).cpu().float().numpy()
    if output_type == "np":
        return arr
    from PIL import Image

    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]
