"""Training configuration: TOML / YAML files mapped onto typed dataclasses.

A config file is plain data (no code is ever executed): sections `model`, `data`, `optim`,
`schedule`, `precision`, `distributed`, `checkpointing`, `validation`, `output`, plus an optional
top-level `stage` naming one of the paper's stages (Table 4), whose resolution, steps, per-GPU
batch and learning rate become the defaults the file's own values override. Unknown keys are
errors naming the nearest valid spelling. CLI overrides use dotted keys with TOML-typed values:
`--set optim.lr=1e-4 --set schedule.snr_gamma=5 --set data.path=/data/x`.

    stage = "text-image-align"
    [model]
    preset = "xl_2"                     # or init_from = "ckpt.safetensors"
    [data]
    path = "data/train/data_info.json"
    cache_dir = "cache/256"             # training reads it when present
    [optim]
    name = "came"
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from pixsigma.diffusion.gaussian import TIMESTEP_SAMPLINGS
from pixsigma.errors import PixsigmaError
from pixsigma.model.transformer import PRESETS as MODEL_PRESETS
from pixsigma.model.transformer import TransformerConfig

# The paper's stages (Table 4): base resolution, steps, per-GPU batch × GPUs, learning rate.
STAGES: dict[str, dict] = {
    "vae-adaption": {"resolution": 256, "max_steps": 8000, "batch_size": 64, "gpus": 16, "lr": 2e-5},
    "text-image-align": {"resolution": 256, "max_steps": 80000, "batch_size": 64, "gpus": 16, "lr": 2e-5},
    "aesthetics-512": {"resolution": 512, "max_steps": 10000, "batch_size": 32, "gpus": 32, "lr": 2e-5},
    "aesthetics-1024": {"resolution": 1024, "max_steps": 5000, "batch_size": 12, "gpus": 32, "lr": 1e-5},
    "kv-compress-1024": {"resolution": 1024, "max_steps": 5000, "batch_size": 12, "gpus": 16, "lr": 1e-5},
    "2k": {"resolution": 2048, "max_steps": 2000, "batch_size": 4, "gpus": 8, "lr": 2e-5},
    "4k": {"resolution": 4096, "max_steps": 1000, "batch_size": 4, "gpus": 8, "lr": 2e-5},
}

PRESETS = tuple(MODEL_PRESETS)  # the names model.preset accepts


@dataclass
class ModelSection:
    preset: str = "xl_2"  # tiny | small | xl_2 (ignored when init_from is set)
    init_from: str | None = None  # any checkpoint load_transformer reads (e.g. from `pixsigma adapt`)
    overrides: dict = field(default_factory=dict)  # TransformerConfig fields, e.g. {depth = 4}
    gradient_checkpointing: bool = False


@dataclass
class DataSection:
    path: str | None = None  # data_info.json (or folder), image folder with .txt, or .jsonl
    layout: str = "auto"
    image_root: str | None = None
    cache_dir: str | None = None  # feature cache; used instead of path when it exists
    text_encoder: str | None = None  # folder (or pipeline folder); raw data only
    vae: str | None = None  # AutoencoderKL folder (or pipeline folder); raw data only
    resolution: int | None = None  # base resolution in px; default: model sample_size × VAE factor
    long_caption_key: str = "sharegpt4v"
    long_caption_ratio: float = 0.6
    max_aspect_ratio: float = 4.0
    drop_last: bool = False


@dataclass
class OptimSection:
    name: str = "came"  # came | adamw
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999, 0.9999])  # AdamW uses the first two
    eps: list[float] = field(default_factory=lambda: [1e-30, 1e-16])  # CAME's two epsilons
    adamw_eps: float = 1e-8
    warmup_steps: int = 500
    # after warmup: "constant" (the paper's schedule) or "cosine" (half a cosine from lr down to
    # min_lr at schedule.max_steps; short runs end better on a decayed lr)
    decay: str = "constant"
    min_lr: float = 0.0
    grad_clip: float = 0.01  # 0 disables
    ema_decay: float = 0.9999  # 0 disables EMA


@dataclass
class ScheduleSection:
    max_steps: int = 1000
    batch_size: int = 8  # per process, per micro-step
    grad_accum: int = 1
    seed: int = 0
    num_timesteps: int = 1000
    snr_gamma: float | None = None  # min-SNR-γ weighting of the MSE term
    x0_weight_cap: float | None = None  # MSE weighted by clamp(1/SNR, 1, cap), mean 1: emphasizes noisy steps
    timestep_sampling: str = "uniform"  # uniform | logit_normal: t = T·sigmoid(mean + std·N(0, 1))
    timestep_logit_mean: float = 0.0
    timestep_logit_std: float = 1.0
    # MSE weight of latent cells under a sample's object mask (data `loss_mask`), widened by
    # object_mask_margin cells, relative to the rest; per sample the weights are scaled to mean 1.
    # Shapes differ only in a rim of pixels, which a plain MSE pays little for (on the toy model,
    # W = 4 or 8 left held-out shape accuracy where it was: see the README). 1 = plain loss.
    object_loss_weight: float = 1.0
    object_mask_margin: int = 1
    log_every: int = 10
    deterministic: bool = False  # torch deterministic algorithms (CPU runs are then bit-reproducible)


@dataclass
class PrecisionSection:
    mixed: str = "no"  # no | fp16 | bf16 (through accelerate; fp16 uses loss scaling)
    attention_fp32: bool = True


@dataclass
class DistributedSection:
    strategy: str = "ddp"  # ddp | fsdp (FSDP2 shards each PixArtBlock; see pixsigma.train.distributed)
    cpu_offload: bool = False  # fsdp: sharded parameters, gradients and optimizer state in host memory


@dataclass
class CheckpointSection:
    every: int = 1000  # steps between checkpoints (0: only the final one)
    keep: int = 3  # keep the last K
    export: str = "ema"  # ema | model: weights of the exported final .safetensors


@dataclass
class ValidationSection:
    every: int = 0  # steps between validation grids (0 disables)
    prompts: list[str] = field(default_factory=lambda: ["a red circle above a blue square", "a photo of a cat"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    steps: int = 20
    guidance_scale: float = 4.5
    sampler: str = "dpm-solver"


@dataclass
class OutputSection:
    dir: str = "runs/train"
    tensorboard: bool = True


@dataclass
class LoraSection:
    """[lora]: train low-rank adapters instead of the whole model (pixsigma.model.lora); the run
    exports RUN/lora.safetensors."""

    rank: int = 16
    alpha: float | None = None  # None: = rank (scale 1)
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attention"])  # attention | attention+mlp | all | module names
    use_dora: bool = False
    use_rslora: bool = False
    init: str = "gaussian"  # A's init (B starts at zero): gaussian (the official script) | kaiming


@dataclass
class ControlNetSection:
    """[controlnet]: train a ControlNet-Transformer on the loaded base (pixsigma.model.controlnet);
    only the copied blocks and projections train; the run exports RUN/controlnet.safetensors."""

    num_blocks: int = 13  # copies of the base's first N blocks (13 of 28 in PixArt-δ); 1..depth-1
    condition: str = "none"  # none (the records' control images as they are) | canny | mask (pixsigma.data.control)
    conditioning_dropout: float = 0.1  # fraction of samples trained with the control latent zeroed


@dataclass
class LcmSection:
    """[lcm]: latent consistency distillation of model.init_from (pixsigma.train.lcm); with [lora]
    too, the student is an LCM-LoRA. Guidance is the pipeline's w (uncond + w·(cond − uncond))."""

    num_ddim_timesteps: int = 50  # the teacher's DDIM solver: 50 of 1000 timesteps (a skip of 20)
    guidance_scale: float = 4.5  # fixed w (PixArt-δ) ...
    guidance_range: list[float] = field(default_factory=list)  # ... or [lo, hi]: w ~ U[lo, hi] per sample
    unconditional: str = "null_caption"  # null_caption (y_embedding) | empty_prompt (needs data.text_encoder)
    timestep_scaling: float = 10.0  # boundary scalings c_skip / c_out
    target_decay: float = 0.95  # EMA target network (0: the student is its own target)
    loss: str = "huber"  # huber | l2
    huber_c: float = 0.001

    def check(self) -> None:
        if self.unconditional not in ("null_caption", "empty_prompt"):
            raise PixsigmaError(f"lcm.unconditional = {self.unconditional!r} is not one of ['null_caption', 'empty_prompt']")
        if self.loss not in ("huber", "l2"):
            raise PixsigmaError(f"lcm.loss = {self.loss!r} is not one of ['huber', 'l2']")
        if self.guidance_range and not (len(self.guidance_range) == 2 and 0 <= self.guidance_range[0] <= self.guidance_range[1]):
            raise PixsigmaError(f"lcm.guidance_range must be [lo, hi] with 0 <= lo <= hi, got {self.guidance_range}")
        if not (self.guidance_scale >= 0 and 0 <= self.target_decay < 1 and self.huber_c > 0 and self.timestep_scaling > 0
                and self.num_ddim_timesteps >= 1):
            raise PixsigmaError("[lcm]: expected guidance_scale >= 0, 0 <= target_decay < 1, huber_c > 0, timestep_scaling > 0 "
                                "and num_ddim_timesteps >= 1")


@dataclass
class IlfSection:
    """[ilf]: Inner Loop Feedback distillation of model.init_from (pixsigma.train.ilf): a feedback
    module at `block` trains against the frozen base's `teacher_steps`-step DPM-Solver++ run so
    that `student_steps` steps land where it does; the run exports RUN/feedback.safetensors."""

    block: int | None = None  # the backbone block whose output the module reads (None: depth // 2)
    teacher_steps: int = 20
    student_steps: int = 10  # must divide teacher_steps
    guidance_scale: float = 4.5  # the guidance distilled (the unconditional branch: the null caption)

    def check(self) -> None:
        if self.teacher_steps < 1 or self.student_steps < 1 or self.teacher_steps % self.student_steps:
            raise PixsigmaError(f"ilf.teacher_steps {self.teacher_steps} must be a positive multiple of "
                                f"ilf.student_steps {self.student_steps}")
        if self.guidance_scale < 0:
            raise PixsigmaError(f"ilf.guidance_scale must be >= 0, got {self.guidance_scale}")



def _one_of(key: str, value, options) -> None:
    if value not in options:
        raise PixsigmaError(f"{key} = {value!r} is not one of {list(options)}")


def _positive(key: str, value, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise PixsigmaError(f"{key} must be {'>= 0' if zero_ok else 'positive'}, got {value}")

@dataclass
class TrainConfig:
    stage: str | None = None
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    checkpointing: CheckpointSection = field(default_factory=CheckpointSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    output: OutputSection = field(default_factory=OutputSection)
    lora: LoraSection | None = None  # a [lora] section: LoRA fine-tuning (pixsigma.train.task.LoraTask)
    controlnet: ControlNetSection | None = None  # a [controlnet] section: ControlNet training (pixsigma.train.controlnet_task)
    lcm: LcmSection | None = None  # an [lcm] section: latent consistency distillation (pixsigma.train.lcm.LcmTask)
    ilf: IlfSection | None = None  # an [ilf] section: feedback-module distillation (pixsigma.train.ilf.IlfTask)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        """Check every value (one-line PixsigmaError naming the key); returns self."""
        self._validate_choices()
        self._validate_sections()
        self._validate_optim()
        self._validate_schedule_and_data()
        return self

    def _validate_choices(self) -> None:
        if self.stage is not None:
            _one_of("stage", self.stage, STAGES)
        if self.model.init_from is None:
            _one_of("model.preset", self.model.preset, PRESETS)
        _one_of("data.layout", self.data.layout, ("auto", "data_info", "folder", "jsonl"))
        _one_of("optim.name", self.optim.name, ("came", "adamw"))
        _one_of("precision.mixed", self.precision.mixed, ("no", "fp16", "bf16"))
        _one_of("distributed.strategy", self.distributed.strategy, ("ddp", "fsdp"))
        _one_of("checkpointing.export", self.checkpointing.export, ("ema", "model"))

    def _validate_sections(self) -> None:
        """The task sections ([lora], [controlnet], [ilf], [lcm]) and which may stand together."""
        if self.lora is not None:
            from pixsigma.model.lora import LoraSpec

            LoraSpec(rank=self.lora.rank, alpha=self.lora.alpha, dropout=self.lora.dropout, targets=tuple(self.lora.targets),
                     init=self.lora.init)  # raises on a bad value
        if self.controlnet is not None:
            _one_of("controlnet.condition", self.controlnet.condition, ("none", "canny", "mask"))
            _positive("controlnet.num_blocks", self.controlnet.num_blocks)
            if not 0 <= self.controlnet.conditioning_dropout < 1:
                raise PixsigmaError(f"controlnet.conditioning_dropout must be in [0, 1), got {self.controlnet.conditioning_dropout}")
            if self.lora is not None:
                raise PixsigmaError("a config has either a [lora] or a [controlnet] section, not both")
        if self.ilf is not None:
            self.ilf.check()
            if any(getattr(self, k) is not None for k in ("lora", "controlnet", "lcm")):
                raise PixsigmaError("an [ilf] section trains a feedback module alone; expected no [lora], [controlnet] or [lcm] beside it")
        if self.lcm is not None:
            self.lcm.check()
            if self.controlnet is not None:
                raise PixsigmaError("a config has either an [lcm] or a [controlnet] section, not both")

    def _validate_optim(self) -> None:
        o = self.optim
        _positive("optim.lr", o.lr)
        _positive("optim.warmup_steps", o.warmup_steps, True)
        _one_of("optim.decay", o.decay, ("constant", "cosine"))
        if not 0 <= o.min_lr <= o.lr:
            raise PixsigmaError(f"optim.min_lr must be in [0, optim.lr = {o.lr}], got {o.min_lr}")
        _positive("optim.grad_clip", o.grad_clip, True)
        if not 0 <= o.ema_decay < 1:
            raise PixsigmaError(f"optim.ema_decay must be in [0, 1), got {o.ema_decay}")
        if len(o.betas) not in (2, 3) or len(o.eps) not in (1, 2):
            raise PixsigmaError("optim.betas needs 2 (AdamW) or 3 (CAME) values and optim.eps 1 or 2")

    def _validate_schedule_and_data(self) -> None:
        s, d = self.schedule, self.data
        _one_of("schedule.timestep_sampling", s.timestep_sampling, TIMESTEP_SAMPLINGS)
        _positive("schedule.timestep_logit_std", s.timestep_logit_std)
        if s.object_loss_weight < 1:
            raise PixsigmaError(f"schedule.object_loss_weight must be >= 1 (1 = plain loss), got {s.object_loss_weight}")
        _positive("schedule.object_mask_margin", s.object_mask_margin, True)
        for key in ("max_steps", "batch_size", "grad_accum", "num_timesteps", "log_every"):
            _positive(f"schedule.{key}", getattr(s, key))
        _positive("checkpointing.every", self.checkpointing.every, True)
        _positive("checkpointing.keep", self.checkpointing.keep)
        _positive("validation.every", self.validation.every, True)
        if not 0 <= d.long_caption_ratio <= 1:
            raise PixsigmaError(f"data.long_caption_ratio must be in [0, 1], got {d.long_caption_ratio}")
        if d.resolution is not None:
            _positive("data.resolution", d.resolution)
        if d.path is None and d.cache_dir is None:
            raise PixsigmaError("no training data: set data.path (and/or data.cache_dir)")


# ---------------------------------------------------------------------------------------------
# dict → dataclass with typed checks
# ---------------------------------------------------------------------------------------------


def _nearest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.0)
    return f"; did you mean {close[0]!r}? (valid: {', '.join(sorted(options))})" if close else ""


def _coerce(value, tp, key: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and inner is not str:
            value = [value]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise PixsigmaError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise PixsigmaError(f"{key} must be a table of key = value, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise PixsigmaError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise PixsigmaError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PixsigmaError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise PixsigmaError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def _build(cls, d: dict, prefix: str = ""):
    if not isinstance(d, dict):
        raise PixsigmaError(f"{prefix.rstrip('.') or 'config'} must be a table, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            raise PixsigmaError(f"unknown config key {prefix + key!r}{_nearest(key, names)}")
        tp = hints[key]
        optional = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]  # an optional section (X | None)
        if optional and value is not None:
            tp = optional[0]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def _check_model_overrides(overrides: dict) -> None:
    names = set(TransformerConfig.__dataclass_fields__)
    for key in overrides:
        if key not in names:
            raise PixsigmaError(f"unknown config key 'model.overrides.{key}'{_nearest(key, names)}")


def parse_value(text: str):
    """A --set value: TOML syntax when it parses (1e-4, true, [1, 2], "x"), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(d: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise PixsigmaError(f"--set {assignment!r}: expected KEY=VALUE with a dotted key, e.g. optim.lr=1e-4")
    key, _, text = assignment.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise PixsigmaError(f"--set {assignment!r}: bad key {key!r}")
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise PixsigmaError(f"--set {assignment!r}: {p!r} is not a section")
    node[parts[-1]] = parse_value(text.strip())


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def stage_defaults(stage: str) -> dict:
    if stage not in STAGES:
        raise PixsigmaError(f"unknown stage {stage!r}{_nearest(stage, STAGES)}")
    s = STAGES[stage]
    return {"data": {"resolution": s["resolution"]}, "schedule": {"max_steps": s["max_steps"], "batch_size": s["batch_size"]},
            "optim": {"lr": s["lr"]}}


def config_from_dict(d: dict, overrides=()) -> TrainConfig:
    d = json.loads(json.dumps(d))  # a deep copy of plain data
    for assignment in overrides:
        apply_override(d, assignment)
    stage = d.get("stage")
    if stage is not None:
        if not isinstance(stage, str):
            raise PixsigmaError(f"stage must be a string, got {stage!r}")
        d = _merge(stage_defaults(stage), d)
    cfg = _build(TrainConfig, d)
    _check_model_overrides(cfg.model.overrides)
    return cfg.validate()


def read_config_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PixsigmaError(f"{path}: config file does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
            return data if data is not None else {}
        if path.suffix == ".json":
            return json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise PixsigmaError(f"{path}: not valid {path.suffix[1:].upper()} ({' '.join(str(e).split())})") from None
    except Exception as e:  # noqa: BLE001 - yaml errors
        raise PixsigmaError(f"{path}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
    raise PixsigmaError(f"{path}: unknown config format; expected .toml, .yaml/.yml or .json")


def load_config(path, overrides=()) -> TrainConfig:
    """Read a TOML/YAML config and apply `--set` style overrides ("section.key=value")."""
    return config_from_dict(read_config_file(path), overrides)
