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
    from pixsigma.train.vae import VAETrainConfig, train_vae

    config = VAETrainConfig(size=args.size, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    train_vae(args.out, config)
    return 0


def add_train_vae(sub) -> None:
    p = sub.add_parser("train-vae", help="train a small AutoencoderKL on the synthetic captioned images")
    p.add_argument("out", help="output folder (a diffusers AutoencoderKL folder)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_vae)


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixsigma", description="PixArt-Σ text-to-image: generate, convert, train, evaluate")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_convert, add_train_vae):
        add(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
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
