"""Training across processes with torch's FSDP2: sharding, sharded checkpoints, the full export.

`[distributed] strategy = "fsdp"` shards the transformer with `fully_shard` (FSDP2): every
PixArtBlock is one unit (its caption K/V projection a unit of its own, since the model calls it
before the blocks run), the embedders and the final layer go with the root. Each rank keeps
1/N of every parameter, gradient and optimizer state; a unit's full weights exist only while it
runs. accelerate still starts the processes (`accelerate launch`, torchrun) and owns the process
group, loss scaling and reductions, but the sharding is applied here directly: accelerate's
FSDP plugin does not run on CPU (gloo), and one code path for CPU and GPU is the one the tests
exercise.

Options: mixed precision (`precision.mixed = "bf16"`: bf16 parameters in compute, fp32
gradient reduction, fp32 master weights), `distributed.cpu_offload` (sharded parameters,
gradients and optimizer state live in host memory), activation checkpointing per block
(`model.gradient_checkpointing`).

Sharded checkpoints use `torch.distributed.checkpoint` with its safetensors storage: each rank
writes `sharded/shard-0000R-of-0000N.safetensors` holding its slices (offsets in the header), so
nothing is pickled, and the folder loads on any number of ranks (resharded), or on one process
without a process group (`load_sharded_weights`). Optimizer scalars and param groups go to
`sharded/optimizer.json`.

CAME keeps factored row/column statistics. Its state is created here as DTensors laid out like
the parameter (row statistics sharded with the rows, column statistics replicated), so CAME's own
step computes the statistics of the whole tensor, not of a shard.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from pixsigma.errors import PixsigmaError
from pixsigma.io import write_json

log = logging.getLogger(__name__)

SHARDED = "sharded"  # the checkpoint sub-folder written by every rank
OPTIMIZER_JSON = "optimizer.json"


# ---------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------


def wants_sharding(strategy: str, world_size: int) -> bool:
    """FSDP is used when asked for and there is more than one process to shard across."""
    if strategy != "fsdp":
        return False
    if world_size < 2:
        log.warning("distributed.strategy = fsdp in a single process: nothing to shard across, training unsharded")
        return False
    return True


def shard_model(model: torch.nn.Module, device: torch.device, mixed: str = "no", cpu_offload: bool = False) -> torch.nn.Module:
    """Apply FSDP2 in place: each block's caption K/V projection, each block, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if not dist.is_initialized():
        raise PixsigmaError("distributed.strategy = fsdp needs a process group: launch with accelerate launch or torchrun")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed)
    mp = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32) if half is not None else MixedPrecisionPolicy()
    kwargs = {"mesh": mesh, "mp_policy": mp, "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
    for block in model.blocks:
        fully_shard(block.cross_attn.kv_linear, **kwargs)
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def prepare(acc, model: torch.nn.Module, make_optimizer, strategy: str, mixed: str = "no", cpu_offload: bool = False):
    """(model, optimizer) ready to train: sharded with FSDP2 or wrapped by accelerate (DDP).

    make_optimizer(params) builds the optimizer; under FSDP it is made after sharding (the
    parameters are then DTensors) and CAME's state is laid out for them."""
    if not wants_sharding(strategy, acc.num_processes):
        model = model.to(acc.device)
        return acc.prepare(model, make_optimizer(model.parameters()))
    model = shard_model(model.to(acc.device), acc.device, mixed, cpu_offload)
    optimizer = make_optimizer(model.parameters())
    init_factored_state(optimizer)
    log.info("FSDP: rank %d of %d holds %d bytes of parameters", acc.process_index, acc.num_processes, local_parameter_bytes(model))
    return model, acc.prepare(optimizer)


def gradient_sync(model: torch.nn.Module, acc, sync: bool):
    """Context for one micro-batch's backward: gradients are reduced only when `sync`."""
    if sync:
        return contextlib.nullcontext()
    if is_sharded(model):
        return _no_reduce(model)
    return acc.no_sync(model)


@contextlib.contextmanager
def _no_reduce(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def local_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds (its shards under FSDP, everything otherwise)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def total_norm(grad_norm):
    """A gradient norm as a plain tensor (clip_grad_norm_ returns a DTensor for sharded grads)."""
    return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm


# ---------------------------------------------------------------------------------------------
# CAME on sharded parameters
# ---------------------------------------------------------------------------------------------


def _like(p, shape: torch.Size, keeps_dim0: bool):
    """Zeros of `shape` as a DTensor on p's mesh: sharded on dim 0 when it is p's dim 0, else replicated."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    placement = Shard(0) if keeps_dim0 else Replicate()
    return distribute_tensor(torch.zeros(shape, dtype=p.dtype, device=p.to_local().device), p.device_mesh, [placement])


def init_factored_state(optimizer) -> None:
    """Create CAME's state for DTensor parameters before its first step (CAME would make plain
    tensors, which cannot meet DTensor gradients); other optimizers are left as they are."""
    if type(optimizer).__name__ != "CAME":
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not hasattr(p, "device_mesh"):
                continue
            shape = p.shape
            state = optimizer.state[p]
            state["step"], state["RMS"] = 0, 0
            state["exp_avg"] = torch.zeros_like(p)
            if len(shape) >= 2:  # factored: row statistics drop the last dim, column ones the second-to-last
                for kind in ("sq", "res"):
                    state[f"exp_avg_{kind}_row"] = _like(p, shape[:-1], True)
                    state[f"exp_avg_{kind}_col"] = _like(p, shape[:-2] + shape[-1:], len(shape) > 2)
            else:
                state["exp_avg_sq"] = torch.zeros_like(p)


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint, safetensors storage)
# ---------------------------------------------------------------------------------------------


def _flat_state(model, optimizer) -> tuple[dict, dict, dict]:
    """(model state dict, flat optimizer state dict, the tensors to store under 'model.' / 'optim.')."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
    tensors = {f"model.{k}": v for k, v in msd.items()}
    tensors.update({f"optim.{k}": v for k, v in osd.items() if torch.is_tensor(v)})
    return msd, osd, tensors


def save_sharded(folder: Path, model, optimizer) -> None:
    """Every rank writes its shards of weights and optimizer state into `folder`; rank 0 the
    optimizer's scalars and param groups (JSON). Collective: all ranks call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    _, osd, tensors = _flat_state(model, optimizer)
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True))
    if dist.get_rank() == 0:
        scalars = {k: v for k, v in osd.items() if not torch.is_tensor(v)}
        write_json(Path(folder) / OPTIMIZER_JSON, scalars, indent=None)


def load_sharded(folder: Path, model, optimizer) -> None:
    """Load a sharded checkpoint (saved on any number of ranks) into a sharded model and its
    optimizer, in place. Collective: all ranks call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    folder = Path(folder)
    if not (folder / OPTIMIZER_JSON).is_file():
        raise PixsigmaError(f"{folder}: not a sharded checkpoint (no {OPTIMIZER_JSON})")
    msd, osd, tensors = _flat_state(model, optimizer)
    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder)))
    for k, v in json.loads((folder / OPTIMIZER_JSON).read_text()).items():
        osd[k] = tuple(v) if isinstance(osd.get(k), tuple) else v
    osd.update({k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")})
    msd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd,
                   options=StateDictOptions(flatten_optimizer_state_dict=True))


def load_sharded_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The full model weights of a sharded checkpoint, assembled in one process (no process
    group needed): the state dict an unsharded model loads."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    reader = HuggingFaceStorageReader(str(folder))
    meta = reader.read_metadata().state_dict_metadata
    out = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items() if k.startswith("model.")}
    if not out:
        raise PixsigmaError(f"{folder}: no model weights in this sharded checkpoint")
    dcp.load(out, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=True)
    return {k[len("model."):]: v for k, v in out.items()}


def gathered_model(model):
    """A plain (unsharded) copy of a sharded model on rank 0, for writing one safetensors file;
    other ranks get an empty copy on the meta device. Collective: all ranks call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from pixsigma.model.transformer import PixArtSigmaTransformer

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    main = dist.get_rank() == 0
    with torch.device("cpu" if main else "meta"):
        full = PixArtSigmaTransformer(model.config)
    if main:
        full.load_state_dict(sd)
    full.history = list(getattr(model, "history", []))
    return full


# ---------------------------------------------------------------------------------------------
# The memory plan: an estimate per rank, without building the model
# ---------------------------------------------------------------------------------------------

# Activations a block keeps for backward, in elements per token per hidden unit: the sub-layers'
# inputs and outputs (norms, modulations, Q/K/V, attention outputs, gates: 16) and the MLP's
# hidden activations before and after the GELU (2 · mlp_ratio). Attention itself keeps no N×N
# matrix (fused SDPA kernels keep a log-sum-exp per query).
_BLOCK_ACTS = 16.0
# With checkpointing: each block's input, the embedders' and final layer's tensors (about 3), and
# one block recomputed at a time during backward.
_CKPT_EXTRA = 3.0


def _param_shapes(config) -> list[torch.Size]:
    from pixsigma.model.transformer import PixArtSigmaTransformer

    with torch.device("meta"):
        return [p.shape for p in PixArtSigmaTransformer(config).parameters()]


def _optimizer_elements(shapes, optimizer: str) -> int:
    """Optimizer state elements: AdamW two moments; CAME a first moment and, for matrices,
    factored row/column statistics of the second moment and of the residual (vectors keep a full one)."""
    if optimizer == "adamw":
        return sum(2 * s.numel() for s in shapes)
    total = 0
    for s in shapes:
        total += s.numel()
        total += 2 * (s[:-1].numel() + (s[:-2] + s[-1:]).numel()) if len(s) >= 2 else s.numel()
    return total


def memory_plan(config, resolution: int, batch: int, world: int, strategy: str, optimizer: str, mixed: str = "no",
                checkpointing: bool = False, vae_factor: int = 8) -> dict[str, int]:
    """Bytes per rank by kind (params, grads, optimizer, working, activations, total) for training
    `config` at `resolution` px with `batch` samples per rank, fp32 master weights."""
    shapes = _param_shapes(config)
    n_params = sum(s.numel() for s in shapes)
    shard = world if strategy == "fsdp" and world > 1 else 1
    block = n_params // config.depth if config.depth else 0  # about one block's parameters (the largest unit)
    act_bytes = 2 if mixed in ("bf16", "fp16") else 4
    if shard > 1:  # two units gathered at a time (the running one, the prefetched one) and one unit's full gradients
        working = 2 * block * act_bytes + block * 4
    else:  # DDP keeps its gradient buckets beside the gradients
        working = 4 * n_params if world > 1 else 0
    tokens = (resolution // vae_factor // config.patch_size) ** 2
    d = config.hidden_size
    per_block = (_BLOCK_ACTS + 2 * config.mlp_ratio) * d
    per_token = (config.depth + _CKPT_EXTRA) * d + per_block if checkpointing else config.depth * per_block
    out = {"params": 4 * n_params // shard, "grads": 4 * n_params // shard,
           "optimizer": 4 * _optimizer_elements(shapes, optimizer) // shard, "working": int(working),
           "activations": int(batch * tokens * per_token * act_bytes)}
    out["total"] = sum(out.values())
    return out


def world_from_env(environ) -> tuple[int, int, int]:
    """(world size, rank, local rank) as torchrun / accelerate launch set them; (1, 0, 0) for a plain run."""
    try:
        return int(environ.get("WORLD_SIZE", 1)), int(environ.get("RANK", 0)), int(environ.get("LOCAL_RANK", 0))
    except ValueError as e:
        raise PixsigmaError(f"WORLD_SIZE / RANK / LOCAL_RANK must be integers ({e})") from None


def _gib(n: int) -> str:
    return f"{n / 2**30:7.2f}"


def describe_plan(cfg, environ) -> list[str]:
    """The plan of a training run, as lines: ranks, sharding, batches, and memory per GPU (the
    config's model, then XL at 1024px / 2K / 4K with and without activation checkpointing)."""
    from pixsigma.model.transformer import PRESETS, xl2_at

    world, rank, local = world_from_env(environ)
    s, strategy = cfg.schedule, cfg.distributed.strategy
    sharded = strategy == "fsdp" and world > 1
    lines = [f"ranks: world size {world} (this process: rank {rank}, local rank {local})",
             f"sharding: {'FSDP2, each PixArtBlock a unit, 1/%d of weights, gradients and optimizer state per rank' % world if sharded else ('none (data parallel)' if world > 1 else 'none (one process)')}"
             + (", CPU offload" if sharded and cfg.distributed.cpu_offload else ""),
             f"batch: {s.batch_size} per rank × {s.grad_accum} accumulation × {world} ranks = {s.batch_size * s.grad_accum * world} per step",
             f"precision: {cfg.precision.mixed if cfg.precision.mixed != 'no' else 'fp32'}; optimizer {cfg.optim.name} (fp32 state)",
             "memory per GPU, GiB (estimate: params, grads, optimizer, gathered units / buckets, activations):",
             f"  {'model':>18s} {'res':>5s} {'ckpt':>5s} {'params':>7s} {'grads':>7s} {'optim':>7s} {'work':>7s} {'acts':>7s} {'total':>7s}"]
    rows = []
    if cfg.model.init_from is None:
        base = PRESETS[cfg.model.preset].with_(**{k: v for k, v in cfg.model.overrides.items() if k != "kv_compress"})
        res = cfg.data.resolution or base.sample_size * 8
        rows.append((f"{cfg.model.preset} (config)", base.with_(sample_size=res // 8), res, cfg.model.gradient_checkpointing))
    for res in (1024, 2048, 4096):
        rows += [("xl_2", xl2_at(res), res, False), ("xl_2", xl2_at(res), res, True)]
    for name, mc, res, ckpt in rows:
        m = memory_plan(mc, res, s.batch_size, world, strategy, cfg.optim.name, cfg.precision.mixed, ckpt)
        lines.append(f"  {name:>18s} {res:5d} {'yes' if ckpt else 'no':>5s} " + " ".join(_gib(m[k]) for k in
                     ("params", "grads", "optimizer", "working", "activations", "total")))
    return lines
