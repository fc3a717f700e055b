"""Files written so that nothing is ever half there, dtype names, and the one weights hash.

Every writer in the package goes through `atomic_write` (or a wrapper below): the bytes go to a
hidden temporary file in the destination folder and are renamed into place with `os.replace`,
which is atomic on POSIX and Windows. A killed process therefore leaves either the old file or
the new one, never a truncated mix; the temporary file is removed on any error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from pixsigma.errors import PixsigmaError

# The one dtype table: every name a config, a CLI flag or a file may use for a torch dtype.
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def as_dtype(dtype) -> torch.dtype:
    """A torch dtype from a dtype or any name in `DTYPES` ("bf16", "float16", "torch.float32")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name in DTYPES:
        return DTYPES[name]
    raise PixsigmaError(f"unknown dtype {dtype!r}; expected one of fp32, bf16, fp16")


def dtype_name(dtype: torch.dtype) -> str:
    """The long name of a dtype ("float32", "bfloat16", ...), as configs and metadata store it."""
    return str(as_dtype(dtype)).removeprefix("torch.")


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path, write: Callable[[Path], None], fsync: bool = False) -> Path:
    """Call `write(tmp)` to produce the file at a temporary path, then rename it onto `path`.

    `fsync=True` flushes the file to disk before the rename, for pointers that must survive a
    power loss (a kill alone never leaves a partial file either way).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path, text: str, fsync: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=fsync)


def write_json(path, obj, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent))


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Tensors (made contiguous, moved to CPU) to a safetensors file, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


@contextmanager
def atomic_dir(path) -> Iterator[Path]:
    """Build a folder under a temporary name and swap it in as `path` when the block succeeds.

    An existing `path` is replaced only after the new folder is complete; a failure leaves the
    old one untouched and removes the partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def weights_hash(state_dict: dict[str, torch.Tensor], length: int = 12) -> str:
    """SHA-256 over names, dtypes and bytes of a state dict, as `length` hex digits.

    Used to name a base model in derived files and PNG metadata, and to check that data-parallel
    ranks hold identical weights.
    """
    h = hashlib.sha256()
    for key, tensor in sorted(state_dict.items()):
        h.update(key.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:length]
