"""The `pixsigma` command line: every subcommand is defined here.

Each subcommand is a `cmd_<name>(args)` function plus its arguments in `build_parser`. Errors
from bad input (`PixsigmaError`, missing files) are printed as one line on stderr with exit
status 2; there is no traceback unless PIXSIGMA_DEBUG=1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pixsigma.errors import PixsigmaError

log = logging.getLogger("pixsigma")


# ---------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------


def cmd_convert(args) -> int:
    from pixsigma.model.checkpoint import convert

    out = convert(args.src, args.dst, to=args.to, num_heads=args.num_heads, sample_size=args.sample_size,
                  pe_interpolation=args.pe_interpolation)
    log.info("wrote %s (%s)", out, args.to)
    return 0


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a transformer checkpoint between official .pth, diffusers and safetensors")
    p.add_argument("src", help="official .pth, diffusers transformer folder or pixsigma .safetensors")
    p.add_argument("dst", help="output file (.pth / .safetensors) or folder (diffusers)")
    p.add_argument("--to", required=True, choices=["diffusers", "safetensors", "official"])
    p.add_argument("--num-heads", type=int, default=None, help="attention heads (default: hidden / 72)")
    p.add_argument("--sample-size", type=int, default=None, help="latent side the model was trained at")
    p.add_argument("--pe-interpolation", type=float, default=None, help="position-embedding interpolation")
    p.set_defaults(func=cmd_convert)


# ---------------------------------------------------------------------------------------------
# train-vae
# ---------------------------------------------------------------------------------------------


def cmd_train_vae(args) -> int:
    from pixsigma.toy.render import generate
    from pixsigma.train.vae import CALIBRATION_BATCHES, VAETrainConfig, train_vae

    config = VAETrainConfig(size=args.size, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            decoder_only=args.decoder_only, object_weight=args.object_weight)
    # The toy images, item i drawn from (seed, i). A continued run (--init-from) starts far down
    # the stream so it sees new images; the scaling factor is measured on a fixed set further on.
    start = 0 if args.init_from is None else 5 * 10**6
    images = (image for image, *_ in generate(None, seed=args.seed, size=args.size, start=start))
    calibration = (image for image, *_ in generate(CALIBRATION_BATCHES * args.batch_size, seed=args.seed, size=args.size,
                                                    start=10**7))
    train_vae(args.out, images, config, init_from=args.init_from, calibration=calibration)
    return 0


def add_train_vae(sub) -> None:
    p = sub.add_parser("train-vae", help="train a small AutoencoderKL on the synthetic captioned images")
    p.add_argument("out", help="output folder (a diffusers AutoencoderKL folder)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", default=None, help="continue training this AutoencoderKL folder")
    p.add_argument("--decoder-only", action="store_true",
                   help="with --init-from: train only the decoder (latents and scaling factor stay the same)")
    p.add_argument("--object-weight", type=float, default=1.0,
                   help="loss weight of pixels off the background color (default 1: plain loss)")
    p.set_defaults(func=cmd_train_vae)


# ---------------------------------------------------------------------------------------------
# generate / info
# ---------------------------------------------------------------------------------------------



def _generate_prompts(args) -> list[str]:
    from pathlib import Path

    if args.prompts_file and args.prompt is not None:
        raise PixsigmaError("give either a prompt or --prompts-file, not both")
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise PixsigmaError(f"{path}: prompts file does not exist; expected a text file with one prompt per line")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise PixsigmaError(f"{path}: not UTF-8 text; expected one prompt per line") from None
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise PixsigmaError(f"{path}: no non-empty line; expected one prompt per line")
        return prompts
    if args.prompt is None:
        raise PixsigmaError("no prompt; expected a prompt argument or --prompts-file FILE")
    return [args.prompt]


def _output_paths(out: str, count: int) -> list:
    from pathlib import Path

    path = Path(out)
    if path.suffix.lower() != ".png":
        raise PixsigmaError(f"output {out!r} does not end in .png; expected a PNG file name")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i:03d}{path.suffix}") for i in range(count)]


def _load_generate_pipeline(model, device, dtype, quantize=None, text_encoder_quantize=None, variant=None):
    from pathlib import Path

    from pixsigma.pipeline import SigmaPipeline

    q = {"quantize": quantize, "text_encoder_quantize": text_encoder_quantize, "variant": variant}
    if model is None:
        return SigmaPipeline.from_pretrained(None, device=device, dtype=dtype, **q)
    p = Path(model)
    if not p.exists():
        raise PixsigmaError(f"{p}: model does not exist; expected a pipeline folder (text_encoder/, tokenizer/, vae/, transformer/) "
                            "or a transformer checkpoint (.pth / .safetensors / diffusers transformer folder)")
    if p.is_dir() and ((p / "vae").is_dir() or (p / "model_index.json").is_file()):
        return SigmaPipeline.from_pretrained(p, device=device, dtype=dtype, **q)
    # A transformer alone: text encoder and VAE come from the shipped default model.
    return SigmaPipeline.from_pretrained(None, transformer=p, device=device, dtype=dtype, **q)


def _check_generate_args(args) -> None:
    """What only the CLI can check: flag combinations and the device (the pipeline checks the rest)."""
    import torch

    if args.num < 1:
        raise PixsigmaError(f"-n {args.num}: expected at least 1 image per prompt")
    if args.size and args.ar:
        raise PixsigmaError("give either --size WxH or --ar H:W, not both")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise PixsigmaError(f"--device {args.device!r}: expected cpu or cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise PixsigmaError("--device cuda: no CUDA device is available; expected --device cpu")


def _adapter_params(args, pipe, loras) -> dict:
    """The PNG parameters of LoRAs, quantization and control, where used."""
    params = {}
    if loras:
        params["lora"] = ",".join(f"{path}:{scale:g}" for path, scale in loras)
    quantized = getattr(pipe.transformer, "quantization", None)
    if quantized or args.quantize_text_encoder:
        params.update(quantize=(quantized or {}).get("mode", "none"), quantize_text_encoder=args.quantize_text_encoder or "none")
    if args.control:
        params.update(control=args.control, control_type=args.control_type, control_scale=args.control_scale,
                      controlnet=args.controlnet)
    return params


def cmd_generate(args) -> int:
    """Generate the PNGs: image k of a prompt gets seed S + k. Each image is its own pipeline call:
    a batched row can differ from the single call in the last float bits (matmul blocking depends
    on the batch size), enough to flip an 8-bit pixel, and the seed a PNG records must reproduce
    it exactly. Sampler, steps, guidance and dtype are checked by the pipeline."""
    import random

    import torch

    import pixsigma
    from pixsigma.pngmeta import generation_params, save_png
    from pixsigma.resolution import parse_ratio, parse_size, size_for_ratio

    prompts = _generate_prompts(args)
    _check_generate_args(args)
    height, width = parse_size(args.size) if args.size else (None, None)
    ratio = parse_ratio(args.ar) if args.ar else None
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    paths = _output_paths(args.output, len(prompts) * args.num)
    existing = [str(p) for p in paths if p.exists()] if not args.overwrite else []
    if existing:
        raise PixsigmaError(f"{existing[0]}: already exists ({len(existing)} of the outputs); expected new file names or --overwrite")

    pipe = _load_generate_pipeline(args.model, args.device, args.dtype, args.quantize, args.quantize_text_encoder,
                                   variant="lcm" if args.fast else None)
    loras = _load_loras(pipe, args.lora or [])
    if args.compile:
        pipe.enable_compile()
    if args.controlnet:
        pipe.set_controlnet(args.controlnet)
    if ratio is not None:
        height, width = size_for_ratio(ratio, pipe.resolution)
    for index, path in enumerate(paths):
        prompt = prompts[index // args.num]
        out = pipe(prompt, negative_prompt=args.negative, num_inference_steps=args.steps, guidance_scale=args.cfg,
                   height=height, width=width, generator=torch.Generator("cpu").manual_seed(seed + index),
                   sampler=args.sampler, output_type="pil", progress=True, guidance_interval=args.guidance_interval,
                   control_image=args.control, control_type=args.control_type,
                   controlnet_conditioning_scale=args.control_scale,
                   step_cache={"mode": args.cache, "interval": args.cache_interval} if args.cache else None)
        image, info = out.images[0], out.info
        params = generation_params(prompt, args.negative, seed + index, info, image.size, pipe.name,
                                   pipe.weights_hash(), args.dtype, pixsigma.__version__)
        params.update(_adapter_params(args, pipe, loras))
        save_png(image, path, params, overwrite=args.overwrite)
        log.info("wrote %s (seed %d, %dx%d)", path, seed + index, image.width, image.height)
    return 0


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate images from text prompts (PNG files carrying their parameters)")
    p.add_argument("prompt", nargs="?", default=None, help='the prompt; may hold "--ar h:w" or "--hw h:w" as in the official code')
    p.add_argument("-o", "--output", default="out.png", help="output PNG (numbered out-000.png ... for several images)")
    p.add_argument("-n", "--num", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image (image k uses seed + k); random if omitted")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default per sampler: dpm-solver 20, sa-solver 25, iddpm 100, lcm 4)")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale (<= 1 disables guidance; default 4.5, or 1 for an LCM model)")
    p.add_argument("--guidance-interval", default=None, metavar="T_MIN,T_MAX",
                   help="guide only at timesteps in this range (default: the model's; 0,999 = every step)")
    p.add_argument("--sampler", default=None,
                   help="dpm-solver | sa-solver | ddim | euler | iddpm | lcm (default: dpm-solver, or lcm for an LCM model)")
    p.add_argument("--fast", action="store_true",
                   help="the model's latent consistency variant (transformer_lcm/; the shipped model has one): 4 LCM steps, no guidance")
    p.add_argument("--cache", default=None, choices=("fora", "delta"),
                   help="training-free step caching: reuse block outputs (fora) or block-range deltas (delta) between "
                        "full steps (see docs/fast_sampling.md)")
    p.add_argument("--cache-interval", type=int, default=2, metavar="K",
                   help="with --cache: run every block at every K-th step (1 = no caching)")
    p.add_argument("--size", default=None, help="output size WIDTHxHEIGHT, e.g. 1024x768 (default: the model's resolution)")
    p.add_argument("--ar", default=None, help="aspect ratio H:W as in the official prompt syntax (e.g. 9:16 is landscape)")
    p.add_argument("--model", default=None, help="pipeline folder or transformer checkpoint (default: the shipped model)")
    p.add_argument("--negative", default="", help="negative prompt (the unconditional branch)")
    p.add_argument("--prompts-file", default=None, help="text file: one image per non-empty line")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16")
    p.add_argument("--compile", action="store_true",
                   help="run the transformer under torch.compile (about 7%% faster per 1024px XL_2 step in bf16) after a "
                        "one-off compile per image size (33 s for XL_2; needs a C++ compiler)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="apply a LoRA (file or PEFT folder) at SCALE (default 1); repeatable, the adapters add up")
    p.add_argument("--controlnet", default=None, help="ControlNet checkpoint for the model (see docs/controlnet.md)")
    p.add_argument("--control", default=None, metavar="IMAGE", help="control image (needs --controlnet)")
    p.add_argument("--control-type", default="none", choices=("none", "canny", "mask"),
                   help="preprocess the control image: none (use as is) | canny (edges) | mask (grayscale)")
    p.add_argument("--control-scale", type=float, default=1.0, help="ControlNet conditioning scale")
    p.add_argument("--quantize", default=None, metavar="MODE",
                   help="transformer weights: int8 | int4 (CPU) | svdquant (W4A4, simulated); see docs/quantization.md")
    p.add_argument("--quantize-text-encoder", default=None, metavar="MODE", help="text encoder weights: int8 | int4 (CPU)")
    p.set_defaults(func=cmd_generate)


def cmd_info(args) -> int:
    import json

    from pixsigma.pngmeta import read_png_params

    params = read_png_params(args.image)
    if args.json:
        print(json.dumps(params, indent=2, ensure_ascii=False, sort_keys=True))
    else:
        for key in sorted(params):
            print(f"{key}: {params[key]}")
    return 0


def add_info(sub) -> None:
    p = sub.add_parser("info", help="print the generation parameters stored in a PNG by pixsigma generate")
    p.add_argument("image", help="a PNG written by pixsigma generate")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)


# ---------------------------------------------------------------------------------------------
# train / extract / adapt
# ---------------------------------------------------------------------------------------------


def cmd_train(args) -> int:
    if args.plan:
        import os

        from pixsigma.train.config import load_config
        from pixsigma.train.distributed import describe_plan

        print("\n".join(describe_plan(load_config(args.config, args.set or []), os.environ)))
        return 0
    from pixsigma.train.loop import train_from_file

    out = train_from_file(args.config, overrides=args.set or [], resume=args.resume, max_steps=args.max_steps, output=args.output)
    log.info("final model: %s", out)
    return 0


def add_run_arguments(p) -> None:
    """The options every command that runs the training loop takes (train, distill lcm|ilf)."""
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in the output folder (with none there: a fresh start, with a warning)")
    p.add_argument("--max-steps", type=int, default=None, help="override schedule.max_steps")
    p.add_argument("--output", default=None, help="override output.dir")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (dotted key, TOML value); repeatable")


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune the transformer from a TOML/YAML config")
    p.add_argument("config", help="training config (.toml / .yaml); see configs/")
    add_run_arguments(p)
    p.add_argument("--plan", action="store_true",
                   help="print ranks, sharding, batches and memory per GPU (world size and ranks from the environment), do not train")
    p.set_defaults(func=cmd_train)


def cmd_extract(args) -> int:
    from pixsigma.data.cache import extract

    d, tokens = {}, None
    if args.config:  # unset options come from the training config's data section, tokens from its model
        from pixsigma.model.transformer import PRESETS
        from pixsigma.train.config import load_config

        cfg = load_config(args.config)
        d = vars(cfg.data)
        if "max_caption_tokens" in cfg.model.overrides:
            tokens = int(cfg.model.overrides["max_caption_tokens"])
        elif cfg.model.init_from:
            from pixsigma.model.checkpoint import read_checkpoint

            tokens = read_checkpoint(cfg.model.init_from)[1].max_caption_tokens
        else:
            tokens = PRESETS[cfg.model.preset].max_caption_tokens
    need = {"dataset": args.dataset or d.get("path"), "--cache": args.cache or d.get("cache_dir"),
            "--vae": args.vae or d.get("vae"), "--text-encoder": args.text_encoder or d.get("text_encoder"),
            "--resolution": args.resolution or d.get("resolution")}
    for name, value in need.items():
        if not value:
            raise PixsigmaError(f"extract needs {name} (give it, or a --config that sets it)")
    extract(need["dataset"], need["--cache"], need["--vae"], need["--text-encoder"], int(need["--resolution"]),
            args.max_tokens or tokens or 300, layout=args.layout or d.get("layout", "auto"),
            long_caption_key=args.long_caption_key or d.get("long_caption_key", "sharegpt4v"),
            max_aspect_ratio=d.get("max_aspect_ratio", 4.0), image_root=d.get("image_root"), patch_size=args.patch_size,
            shard_size=args.shard_size, batch_size=args.batch_size, start=args.start, end=args.end, rank=args.rank,
            world_size=args.world_size, dtype=args.dtype, device=args.device, control_type=args.control_type)
    return 0


def add_extract(sub) -> None:
    p = sub.add_parser("extract", help="encode a dataset once (text encoder + VAE) into a sharded feature cache")
    p.add_argument("dataset", nargs="?", default=None, help="data_info.json (or folder), image folder with .txt, or .jsonl")
    p.add_argument("--config", default=None, help="take unset options from a training config's data/model sections")
    p.add_argument("--cache", default=None, help="cache folder (default: the config's data.cache_dir)")
    p.add_argument("--vae", default=None, help="AutoencoderKL folder (or pipeline folder)")
    p.add_argument("--text-encoder", default=None, help="text encoder folder (or pipeline folder with text_encoder/ + tokenizer/)")
    p.add_argument("--resolution", type=int, default=None, help="base resolution in pixels (aspect bins of this size)")
    p.add_argument("--max-tokens", type=int, default=None, help="caption tokens (default: the config's model, else 300)")
    p.add_argument("--patch-size", type=int, default=2, help="transformer patch size (bins are multiples of patch × VAE factor)")
    p.add_argument("--layout", default=None, choices=["auto", "data_info", "folder", "jsonl"])
    p.add_argument("--long-caption-key", default=None, help="long caption field (default sharegpt4v)")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--start", type=int, default=None, help="first sample index of this process's range")
    p.add_argument("--end", type=int, default=None, help="end (exclusive) of this process's range")
    p.add_argument("--rank", type=int, default=None, help="this process (default: $RANK or 0)")
    p.add_argument("--world-size", type=int, default=None, help="processes (default: $WORLD_SIZE or 1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="storage dtype")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--control-type", default="none", choices=["none", "canny", "mask"],
                   help="ControlNet control latents: the records' control images as they are (none), or that "
                        "preprocessor applied to them, or to the picture when a record names none")
    p.set_defaults(func=cmd_extract)


def cmd_adapt(args) -> int:
    from pixsigma.train import adapt

    if args.transition == "vae":
        adapt.adapt_vae(args.src, args.dst, args.vae, caches=args.cache or [])
    elif args.transition == "resolution":
        adapt.adapt_resolution(args.src, args.dst, args.resolution, args.pe_interpolation, args.vae_factor)
    elif args.transition == "kv-compress":
        adapt.adapt_kv_compress(args.src, args.dst, args.layers, args.operator, args.ratio)
    elif args.transition == "depth":
        adapt.adapt_depth(args.src, args.dst, args.add, args.at)
    else:
        adapt.adapt_tokens(args.src, args.dst, args.tokens)
    return 0


def add_adapt(sub) -> None:
    p = sub.add_parser("adapt", help="weak-to-strong transitions: new VAE, resolution, KV compression, caption length, depth")
    t = p.add_subparsers(dest="transition", required=True)

    def common(q):
        q.add_argument("src", help="transformer checkpoint (any layout load_transformer reads)")
        q.add_argument("dst", help="output pixsigma .safetensors")

    q = t.add_parser("vae", help="swap the VAE: record it, mark old feature caches stale")
    common(q)
    q.add_argument("--vae", required=True, help="the new AutoencoderKL folder")
    q.add_argument("--cache", action="append", help="feature cache folder to mark stale; repeatable")
    q = t.add_parser("resolution", help="new base resolution (sample size, pe_interpolation, aspect bins)")
    common(q)
    q.add_argument("--resolution", type=int, required=True, help="new base resolution in pixels")
    q.add_argument("--pe-interpolation", type=float, default=None, help="default: scaled with the size")
    q.add_argument("--vae-factor", type=int, default=None, help="VAE downsampling factor (default: recorded, else 8)")
    q = t.add_parser("kv-compress", help="add KV token compression (Conv Avg Init)")
    common(q)
    q.add_argument("--layers", default="deep", help="deep (default), all, 14-27 or 3,5,7")
    q.add_argument("--operator", default="conv", choices=["conv", "ave", "uniform"])
    q.add_argument("--ratio", type=int, default=2, help="R: keys/values merged over R×R windows")
    q = t.add_parser("tokens", help="change the caption length (e.g. 120 -> 300)")
    common(q)
    q.add_argument("--tokens", type=int, required=True)
    q = t.add_parser("depth", help="insert blocks that start as identities (the model's output is unchanged)")
    common(q)
    q.add_argument("--add", type=int, required=True, help="how many blocks to insert")
    q.add_argument("--at", type=int, default=None, help="index of the first new block (default: after the shallow half)")
    p.set_defaults(func=cmd_adapt)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """PATH[:SCALE] -> (path, scale); a trailing ":number" is the scale."""
    path, sep, scale = text.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def _load_loras(pipe, specs: list[str]) -> list[tuple[str, float]]:
    loras = [parse_lora_arg(s) for s in specs]
    names = [pipe.load_lora_weights(path) for path, _ in loras]
    if names:
        pipe.set_adapters(names, [scale for _, scale in loras])
    return loras


def cmd_lora(args) -> int:
    from pixsigma.model.lora import merge_lora

    out = merge_lora(args.base, args.lora, args.out, scale=args.scale)
    log.info("wrote %s (base + %g x LoRA)", out, args.scale)
    return 0


def add_lora(sub) -> None:
    p = sub.add_parser("lora", help="LoRA files: merge one into a full checkpoint")
    t = p.add_subparsers(dest="lora_command", required=True)
    q = t.add_parser("merge", help="write base + scale x LoRA as a full pixsigma .safetensors checkpoint")
    q.add_argument("base", help="transformer checkpoint (any layout load_transformer reads)")
    q.add_argument("lora", help="LoRA file or PEFT adapter folder")
    q.add_argument("out", help="output .safetensors")
    q.add_argument("--scale", type=float, default=1.0, help="LoRA strength (default 1)")
    p.set_defaults(func=cmd_lora)


def cmd_distill(args) -> int:
    """`pixsigma distill KIND CONFIG`: the training loop with the [KIND] section (its defaults
    when the config has none), which picks the distillation task."""
    from pixsigma.train.config import load_config
    from pixsigma.train.loop import train_from_file

    kind = args.distillation
    extra = list(args.set or [])
    if getattr(load_config(args.config, extra), kind) is None:
        extra.append(f"{kind}={{}}")
    out = train_from_file(args.config, extra, resume=args.resume, max_steps=args.max_steps, output=args.output)
    log.info("%s: %s", "distilled model" if kind == "lcm" else "feedback module", out)
    return 0


# pixsigma distill KIND: (what it trains, what model.init_from names)
DISTILLATIONS = {
    "lcm": ("latent consistency distillation (PixArt-δ) of model.init_from: full weights, or an LCM-LoRA with a "
            "[lora] section; settings in [lcm]", "the teacher"),
    "ilf": ("Inner Loop Feedback: train a feedback module on the frozen model.init_from against its many-step "
            "sampler; settings in [ilf]", "the base"),
}


def add_distill(sub) -> None:
    p = sub.add_parser("distill", help="distil a model into a faster one through the training loop")
    kinds = p.add_subparsers(dest="distillation", required=True)
    for kind, (help_text, base) in DISTILLATIONS.items():
        q = kinds.add_parser(kind, help=help_text)
        q.add_argument("config", help=f"training config (.toml / .yaml) with model.init_from = {base}")
        add_run_arguments(q)
        q.set_defaults(func=cmd_distill)


TRAIN_COMMANDS = (add_train, add_extract, add_adapt, add_lora, add_distill)


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------


def cmd_eval_adherence(args) -> int:
    from pixsigma.eval.adherence import evaluate_adherence
    from pixsigma.toy.evaluate import format_table

    report = evaluate_adherence(args.model, transformer=args.transformer, prompts=args.prompts, seeds=args.seeds,
                                steps=args.steps, guidance_scale=args.cfg, guidance_interval=args.guidance_interval,
                                sampler=args.sampler, size=args.size, batch_size=args.batch_size, dtype=args.dtype,
                                save_images=args.save_images, json_path=args.json,
                                loras=[parse_lora_arg(s) for s in args.lora or []])
    print(format_table(report))
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model")
    kinds = p.add_subparsers(dest="evaluation", required=True)
    q = kinds.add_parser("adherence", help="GenEval-style prompt adherence on the toy world (color, shape, position, count)")
    q.add_argument("--model", default=None, help="pipeline folder (default: the shipped model)")
    q.add_argument("--transformer", default=None, help="a transformer checkpoint replacing the folder's")
    q.add_argument("--prompts", default="heldout",
                   help="heldout (default, 240 prompts), quick (24), new:lime (40, a color outside the training palette), "
                        "or a file, one prompt per line")
    q.add_argument("--lora", action="append", metavar="PATH[:SCALE]", help="apply a LoRA at SCALE (default 1); repeatable")
    q.add_argument("--seeds", type=int, default=4, help="images per prompt, seeds 0..N-1")
    q.add_argument("--steps", type=int, default=20)
    q.add_argument("--cfg", type=float, default=4.5)
    q.add_argument("--guidance-interval", default=None, metavar="T_MIN,T_MAX",
                   help="guide only at timesteps in this range (default: the model's; 0,999 = every step)")
    q.add_argument("--sampler", default="dpm-solver")
    q.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="transformer weights (bf16: ~2.5x faster on CPU; text encoder and VAE stay fp32)")
    q.add_argument("--json", default=None, help="save the report here")
    q.add_argument("--save-images", default=None, help="folder to keep the generated images in")
    q.set_defaults(func=cmd_eval_adherence)


# ---------------------------------------------------------------------------------------------
# ship
# ---------------------------------------------------------------------------------------------


def cmd_ship(args) -> int:
    from pixsigma.toy.ship import ship

    variants = dict(v.split("=", 1) for v in args.variant or [] if "=" in v)
    if len(variants) != len(args.variant or []):
        raise PixsigmaError("--variant expects NAME=CHECKPOINT, e.g. lcm=runs/toy/lcm/model.safetensors")
    ship(args.vae, args.transformer, dest=args.dest, model_card=args.model_card, variants=variants)
    return 0


def add_ship(sub) -> None:
    p = sub.add_parser("ship", help="write a trained VAE + transformer as a pipeline folder (default: the package's default model)")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder")
    p.add_argument("--transformer", required=True, help="transformer checkpoint (any layout load_transformer reads); stored in fp16")
    p.add_argument("--dest", default=None, help="output folder (default: pixsigma/assets/default_model, replaced whole)")
    p.add_argument("--model-card", default=None, help="Markdown file to ship as MODEL_CARD.md (default: a generated card)")
    p.add_argument("--variant", action="append", metavar="NAME=CHECKPOINT",
                   help="a further transformer shipped as transformer_NAME/ (e.g. lcm=...: the LCM variant); repeatable")
    p.set_defaults(func=cmd_ship)


# ---------------------------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------------------------


def serve_config(args):
    """The server's settings from the arguments; the API key from --api-key, else $PIXSIGMA_API_KEY."""
    import pixsigma
    from pixsigma.serve.config import API_KEY_ENV, ServeConfig

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    return ServeConfig(host=args.host, port=args.port, max_queue=args.max_queue, timeout_s=args.timeout, api_key=api_key,
                       allow_remote=args.allow_remote, max_images=args.max_images, max_side=args.max_side,
                       ui=not args.no_ui, dtype=args.dtype, version=pixsigma.__version__).check()


def cmd_serve(args) -> int:
    from pathlib import Path

    from pixsigma.serve.api import run_server

    config = serve_config(args)  # checked before the model loads
    pipe = _load_generate_pipeline(args.model, args.device, args.dtype)
    for path in args.lora or []:  # off (scale 0) until a request names it
        pipe.load_lora_weights(path, adapter_name=Path(path).stem, scale=0.0)
    if args.controlnet:  # used by requests that carry a control_image
        pipe.set_controlnet(args.controlnet)
    run_server(pipe, config)
    return 0


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve the model: an HTTP API (OpenAI images shape) and a web UI, one worker")
    p.add_argument("--model", default=None, help="pipeline folder or transformer checkpoint (default: the shipped model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback unless --allow-remote)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--max-queue", type=int, default=8, help="requests that may wait behind the running one (more get 429)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may wait and run before it gets 504")
    p.add_argument("--api-key", default=None, help="require this key on every API route and the UI (default: $PIXSIGMA_API_KEY)")
    p.add_argument("--allow-remote", action="store_true", help="allow a --host that is not loopback")
    p.add_argument("--max-images", type=int, default=4, help="the most images (n) one request may ask for")
    p.add_argument("--max-side", type=int, default=None, help="the largest image side (default: 2x the model's, at least 1024)")
    p.add_argument("--no-ui", action="store_true", help="serve the API only")
    p.add_argument("--lora", action="append", metavar="PATH",
                   help="load a LoRA that requests may use by its file name's stem, {\"lora\": {\"STEM\": scale}}; repeatable")
    p.add_argument("--controlnet", default=None, metavar="PATH",
                   help="load a ControlNet for the model; requests may then send a control_image (see docs/serving.md)")
    p.set_defaults(func=cmd_serve)


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixsigma", description="PixArt-Σ text-to-image: generate, convert, train, evaluate")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_convert, add_train_vae, add_generate, add_info, add_eval, add_ship, add_serve):
        add(sub)
    for add in TRAIN_COMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    # torchao (imported by peft and diffusers when installed) warns at import about kernels built
    # for other platforms and about torch.compile registrations; nothing a CLI user can act on
    for name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except (PixsigmaError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        if os.environ.get("PIXSIGMA_DEBUG"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"pixsigma {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pixsigma {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
