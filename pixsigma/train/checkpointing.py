"""Training checkpoints: written atomically, never pickled, resumable bit for bit.

`RUN/checkpoints/step-00001000/` holds
- `model.safetensors`, `ema.safetensors`: pixsigma files (`save_safetensors`), loadable by
  `load_transformer`;
- `optimizer.safetensors` + `optimizer.json`: every state tensor, and the structure (param groups,
  scalar state, which tensor goes where) as JSON;
- `state.json`: step, data position (epoch, batch index in epoch), lr, loss-scaler state, config;
- `rng-rank{R}.json`: each process's python / numpy / torch (and CUDA) RNG states and the
  training generator.
- under FSDP, `sharded/` (every rank's slices of weights and optimizer state, see
  `pixsigma.train.distributed`) instead of `model.safetensors` and the optimizer files.
Every file is written through `pixsigma.io`. The folder is assembled as `.tmp-step-…` (one fixed
name, since every rank writes its RNG file into it) and renamed into place; only then is the
`latest` file (its name) replaced atomically, and older checkpoints beyond `keep` removed. A kill
at any moment leaves `latest` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from pixsigma.errors import PixsigmaError
from pixsigma.io import write_json, write_safetensors, write_text
from pixsigma.model.checkpoint import save_safetensors

log = logging.getLogger(__name__)

LATEST = "latest"
_STEP_DIR = re.compile(r"step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------------------------------------
# Optimizer state without pickle
# ---------------------------------------------------------------------------------------------


def optimizer_to_files(state_dict: dict) -> tuple[dict, dict]:
    """(tensors for safetensors, JSON-able structure) from `optimizer.state_dict()`."""
    tensors, state = {}, {}
    for pid, entries in state_dict["state"].items():
        out = {}
        for k, v in entries.items():
            if torch.is_tensor(v):
                name = f"{pid}.{k}"
                tensors[name] = v.detach().contiguous().cpu()
                out[k] = {"tensor": name}
            elif isinstance(v, (int, float, bool)) or v is None:
                out[k] = {"value": v}
            else:
                raise PixsigmaError(f"optimizer state {k!r} of type {type(v).__name__} cannot be saved without pickle")
        state[str(pid)] = out
    return tensors, {"state": state, "param_groups": state_dict["param_groups"]}


def optimizer_from_files(tensors: dict, structure: dict, like: dict) -> dict:
    """The inverse of `optimizer_to_files`; tuples in `like`'s param groups are restored as tuples."""
    state = {}
    for pid, entries in structure["state"].items():
        state[int(pid)] = {k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in entries.items()}
    groups = []
    for saved, current in zip(structure["param_groups"], like["param_groups"]):
        g = dict(saved)
        for k, v in current.items():
            if isinstance(v, tuple) and isinstance(g.get(k), list):
                g[k] = tuple(g[k])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------
# RNG states as JSON
# ---------------------------------------------------------------------------------------------


def rng_state(generator: torch.Generator | None = None) -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    out = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    if generator is not None:
        out["generator"] = generator.get_state().tolist()
    return out


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    if generator is not None and "generator" in state:
        generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------


def checkpoint_root(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def _write_shared_files(folder: Path, step: int, model, ema, optimizer_state: dict | None, state: dict,
                        write_weights=save_safetensors) -> None:
    """Rank 0's part of a checkpoint: weights, EMA, optimizer state and state.json.
    write_weights(module, path, metadata) writes a module's weights (the training task's choice)."""
    if model is not None:  # None: the weights are in the sharded folder
        write_weights(model, folder / "model.safetensors", {"pixsigma_step": str(step)})
    if ema is not None:
        write_weights(ema, folder / "ema.safetensors", {"pixsigma_step": str(step), "pixsigma_ema": "1"})
    if optimizer_state is not None:
        tensors, structure = optimizer_to_files(optimizer_state)
        write_safetensors(folder / "optimizer.safetensors", tensors)
        write_json(folder / "optimizer.json", structure, indent=None)
    write_json(folder / "state.json", {**state, "step": step}, indent=1)


def _publish(tmp: Path, final: Path) -> None:
    """Flush the assembled folder to disk, rename it into place, then point `latest` at it."""
    for f in tmp.iterdir():
        if f.is_dir():  # the sharded folder: torch.distributed.checkpoint syncs its own files
            continue
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text(final.parent / LATEST, final.name + "\n", fsync=True)


def save_checkpoint(run_dir, step: int, *, model, ema, optimizer_state: dict | None, state: dict, rng: dict,
                    rank: int = 0, barrier=lambda: None, keep: int = 3, sharded=None, write_weights=save_safetensors) -> Path:
    """Write one checkpoint (see module doc). Every process calls it; rank 0 writes the shared
    files, each rank its RNG file; `barrier` synchronizes the processes. sharded(folder): a
    collective write every rank makes into the temporary folder (FSDP weights and optimizer)."""
    root = checkpoint_root(run_dir)
    name = step_dir_name(step)
    tmp, final = root / f".tmp-{name}", root / name
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a run killed while writing this step
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    write_json(tmp / f"rng-rank{rank}.json", rng, indent=None)
    if sharded is not None:
        sharded(tmp)
    if rank == 0:
        _write_shared_files(tmp, step, model, ema, optimizer_state, state, write_weights)
    barrier()
    if rank == 0:
        _publish(tmp, final)
        prune(root, keep)
        log.info("checkpoint %s", final)
    barrier()
    return final


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(out)


def prune(root: Path, keep: int) -> None:
    latest = latest_checkpoint(root.parent)
    ckpts = list_checkpoints(root)
    for _, p in ckpts[:-keep] if keep > 0 else []:
        if latest is None or p.resolve() != latest.resolve():
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir) -> Path | None:
    root = checkpoint_root(run_dir)
    pointer = root / LATEST
    if pointer.is_file():
        p = root / pointer.read_text().strip()
        if (p / "state.json").is_file():
            return p
    ckpts = [p for _, p in list_checkpoints(root) if (p / "state.json").is_file()]
    return ckpts[-1] if ckpts else None


def load_checkpoint(path, rank: int = 0) -> dict:
    """{'state', 'rng', 'model' (state dict), 'ema' (state dict or None), 'optimizer' (tensors, structure)}."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise PixsigmaError(f"{path}: not a training checkpoint (no state.json)")
    out = {"path": path, "state": json.loads((path / "state.json").read_text())}
    rng_file = path / f"rng-rank{rank}.json"
    out["rng"] = json.loads(rng_file.read_text()) if rng_file.is_file() else None
    out["model"] = load_file(str(path / "model.safetensors")) if (path / "model.safetensors").is_file() else None
    out["ema"] = load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").is_file() else None
    if (path / "optimizer.safetensors").is_file():
        out["optimizer"] = (load_file(str(path / "optimizer.safetensors")), json.loads((path / "optimizer.json").read_text()))
    else:
        out["optimizer"] = None
    return out
