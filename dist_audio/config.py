"""Typed run configuration: one dataclass per concern, read from YAML, checked before anything runs.

A run config has five sections: ``model`` (``SashimiConfig`` or ``TFSWAConfig``, chosen by
``model.name``), ``data``, ``optim``, ``train`` and ``log``. ``load_config`` reads a YAML file,
applies ``--set``-style overrides (``"optim.lr=3e-4"``), converts every value to the declared type
and validates ranges and cross-section rules. Any problem raises one ``ConfigError`` that names the
offending key, so launchers can print it and exit with code 2 instead of a traceback.

The distribution strategy (DDP, ZeRO, FSDP, offload) is *not* here: it lives in the Accelerate
config file the run is launched with (``configs/accelerate/*.yaml``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dist_audio.storage import parse_location

__all__ = [
    "MODEL_CONFIGS",
    "ConfigError",
    "DataConfig",
    "LogConfig",
    "OptimConfig",
    "RunConfig",
    "S4Config",
    "SashimiConfig",
    "TFSWAConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
]


class ConfigError(ValueError):
    """A user error in a run config; ``key`` is the dotted path of the offending entry."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config error at '{key}': {message}" if key else f"config error: {message}")


# --------------------------------------------------------------------------------------------------
# model sections
# --------------------------------------------------------------------------------------------------


@dataclass
class S4Config:
    """The state-space layer inside SaShiMi (paper: Goel et al. 2022, section 3)."""

    mode: Literal["diag", "dplr"] = "diag"  # S4D (diagonal, ZOH) or S4 (DPLR, bilinear, Cauchy kernel)
    init: Literal["diag-lin", "diag-inv", "legs"] = "diag-lin"  # legs is the HiPPO-LegS init for dplr
    d_state: int = 64
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    lr: float = 1e-3  # learning rate of the SSM parameters (dt, A, B, P); no weight decay
    kernel_chunk: int = 64  # dplr: frequencies per recomputed kernel chunk (small chunks stay in cache)
    l_max: int = 16384  # dplr: the input length (samples) the learned C~ = C(I - A^L) is defined at; longer is refused

    def validate(self, key: str) -> None:
        _check(self.d_state > 0 and self.d_state % 2 == 0, f"{key}.d_state", "must be a positive even number")
        _check(self.l_max > 0, f"{key}.l_max", "must be > 0")
        _check(0 < self.dt_min <= self.dt_max, f"{key}.dt_min", "need 0 < dt_min <= dt_max")
        _check(self.lr > 0, f"{key}.lr", "must be > 0")
        _check(self.kernel_chunk > 0, f"{key}.kernel_chunk", "must be > 0")
        if self.mode == "dplr":
            _check(self.init == "legs", f"{key}.init", "mode 'dplr' uses the HiPPO-LegS init: set init: legs")
        else:
            _check(self.init != "legs", f"{key}.init", "mode 'diag' takes init diag-lin or diag-inv")


@dataclass
class SashimiConfig:
    """SaShiMi autoregressive waveform model over 2^bits quantized levels."""

    name: Literal["sashimi"] = "sashimi"
    d_model: int = 64
    n_layers: int = 8  # residual blocks per stage (S4 and FF alternate)
    pool: list[int] = field(default_factory=lambda: [4, 4])
    expand: int = 2  # channel multiplier at each DownPool
    ff: int = 2  # feed-forward expansion
    glu: bool = False  # GLU output linear in the S4 layer
    unet: bool = False  # residual blocks on the down path as well
    dropout: float = 0.0
    bits: int = 8
    head: Literal["categorical", "dml"] = "categorical"
    n_mixtures: int = 6  # DML head only
    sample_rate: int = 16000  # of the training audio; generated WAVs and previews are written at it
    s4: S4Config = field(default_factory=S4Config)

    def validate(self, key: str) -> None:
        for name in ("d_model", "n_layers", "expand", "ff", "n_mixtures", "sample_rate"):
            _check(getattr(self, name) > 0, f"{key}.{name}", "must be > 0")
        _check(all(p >= 1 for p in self.pool), f"{key}.pool", "every pooling factor must be >= 1")
        _check(1 <= self.bits <= 16, f"{key}.bits", "must be in 1..16")
        _check(0.0 <= self.dropout < 1.0, f"{key}.dropout", "must be in [0, 1)")
        self.s4.validate(f"{key}.s4")


@dataclass
class TFSWAConfig:
    """TF-SWA residual U-Net source separator on the STFT (Yao et al. 2025)."""

    name: Literal["tfswa"] = "tfswa"
    sources: list[str] = field(default_factory=lambda: ["drums", "bass", "other", "vocals"])
    channels: int = 2  # audio channels of the mixture
    n_fft: int = 2048
    hop: int = 441
    subbands: int = 1  # frequency sub-bands stacked as channels
    dims: list[int] = field(default_factory=lambda: [32, 64, 128, 256])  # channel width per stage
    depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])  # residual modules per stage
    heads: int = 4
    window: list[int] = field(default_factory=lambda: [8, 8])  # Swin window (frames, bins)
    attention: Literal["bottleneck", "every_stage"] = "bottleneck"
    output: Literal["mask", "magnitude"] = "mask"
    mrstft_weight: float = 0.0  # weight of the multi-resolution STFT loss term next to waveform L1
    dropout: float = 0.0
    sample_rate: int = 44100  # the rate the model was trained at; separate.py resamples input to it
    swin_depth: int = 2  # Swin layers per TFSWA module, alternating regular and shifted windows
    mlp_ratio: int = 2  # hidden width of the feed-forward after each window attention, × the stage width

    def validate(self, key: str) -> None:
        _check(len(self.sources) > 0, f"{key}.sources", "need at least one source")
        _check(len(set(self.sources)) == len(self.sources), f"{key}.sources", "sources must be unique")
        _check(self.channels in (1, 2), f"{key}.channels", "must be 1 or 2")
        _check(self.n_fft > 0 and self.hop > 0, f"{key}.n_fft", "n_fft and hop must be > 0")
        _check(self.hop <= self.n_fft, f"{key}.hop", "must be <= n_fft")
        _check(self.subbands >= 1, f"{key}.subbands", "must be >= 1")
        _check(len(self.dims) > 0, f"{key}.dims", "need at least one stage")
        _check(len(self.depths) == len(self.dims), f"{key}.depths", "must have one entry per entry of dims")
        _check(all(d > 0 for d in self.dims), f"{key}.dims", "every width must be > 0")
        _check(all(d >= 0 for d in self.depths), f"{key}.depths", "every depth must be >= 0")
        _check(self.heads > 0, f"{key}.heads", "must be > 0")
        _check(len(self.window) == 2 and min(self.window) > 0, f"{key}.window", "must be [frames, bins] > 0")
        _check(self.mrstft_weight >= 0, f"{key}.mrstft_weight", "must be >= 0")
        _check(0.0 <= self.dropout < 1.0, f"{key}.dropout", "must be in [0, 1)")
        _check(self.sample_rate > 0, f"{key}.sample_rate", "must be > 0")
        _check(self.swin_depth >= 0, f"{key}.swin_depth", "must be >= 0")
        _check(self.mlp_ratio >= 1, f"{key}.mlp_ratio", "must be >= 1")
        _check(all(d % self.heads == 0 for d in self.dims), f"{key}.heads",
               f"every stage width in dims {self.dims} must be divisible by heads ({self.heads})")


MODEL_CONFIGS: dict[str, type] = {"sashimi": SashimiConfig, "tfswa": TFSWAConfig}
ModelConfig = SashimiConfig | TFSWAConfig


# --------------------------------------------------------------------------------------------------
# data, optimizer, training, logging
# --------------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the shards are and how batches are cut from them (see ``dist_audio.data``)."""

    shards: str = ""  # directory or URL (s3://, gs://, http(s)://) holding manifest.json and the tar shards
    remote_timeout_s: float = 60.0  # a URL source unreachable this long (retries and all) ends the run
    cache_dir: str = ""  # URL sources: keep fetched shard indexes and member bytes here ("" = no cache)
    cache_max_gib: float = 10.0  # size limit of cache_dir; least recently used entries go first
    task: Literal["autoregressive", "separation"] = "autoregressive"
    batch_size: int = 8  # per rank, per micro-step
    segment_seconds: float = 1.0  # length of one training crop
    num_workers: int = 0
    shuffle_buffer: int = 256  # samples per window of the epoch order that is shuffled (0 or 1: none)
    # autoregressive (SaShiMi) token settings
    bits: int = 8
    quantization: Literal["mu-law", "linear"] = "mu-law"
    interleave_stereo: bool = False  # L/R interleaved into one sequence of twice the length
    # separation: stems stacked in this order (must equal model.sources)
    sources: list[str] = field(default_factory=lambda: ["drums", "bass", "other", "vocals"])
    remix: bool = True  # stems drawn from different chunks, random gain, channel swap, sign flip
    remix_gain: list[float] = field(default_factory=lambda: [0.25, 1.25])  # per-stem gain range [low, high]
    # corrupt input tolerance: stop if more than this fraction of a window of samples is bad
    max_bad_fraction: float = 0.01
    bad_window: int = 1000  # samples per window (counted per loader worker)

    def validate(self, key: str) -> None:
        _check(bool(self.shards), f"{key}.shards", "required: the directory made by `python -m data_prep.shard`")
        try:
            parse_location(self.shards)
        except ValueError as err:
            raise ConfigError(f"{key}.shards", str(err)) from None
        _check(self.remote_timeout_s > 0, f"{key}.remote_timeout_s", "must be > 0")
        _check(self.cache_max_gib > 0, f"{key}.cache_max_gib", "must be > 0")
        _check(self.batch_size > 0, f"{key}.batch_size", "must be > 0")
        _check(self.segment_seconds > 0, f"{key}.segment_seconds", "must be > 0")
        _check(self.num_workers >= 0, f"{key}.num_workers", "must be >= 0")
        _check(self.shuffle_buffer >= 0, f"{key}.shuffle_buffer", "must be >= 0")
        _check(1 <= self.bits <= 16, f"{key}.bits", "must be in 1..16")
        _check(0.0 <= self.max_bad_fraction <= 1.0, f"{key}.max_bad_fraction", "must be in [0, 1]")
        _check(self.bad_window > 0, f"{key}.bad_window", "must be > 0")
        _check(len(self.remix_gain) == 2 and 0 <= self.remix_gain[0] <= self.remix_gain[1],
               f"{key}.remix_gain", "must be [low, high] with 0 <= low <= high")


@dataclass
class OptimConfig:
    """AdamW with warmup and a decay schedule; the model supplies its own parameter groups."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    schedule: Literal["cosine", "constant", "plateau"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    plateau_patience: int = 5  # validations without improvement before the lr is cut
    plateau_factor: float = 0.5
    ema_decay: float = 0.0  # 0 disables the EMA of the weights

    def validate(self, key: str) -> None:
        _check(self.lr > 0, f"{key}.lr", "must be > 0")
        _check(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{key}.betas", "two values in [0, 1)")
        _check(self.eps > 0, f"{key}.eps", "must be > 0")
        _check(self.grad_clip >= 0, f"{key}.grad_clip", "must be >= 0")
        _check(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, f"{key}.min_lr_ratio", "must be in [0, 1]")
        _check(self.plateau_patience >= 1, f"{key}.plateau_patience", "must be >= 1")
        _check(0 < self.plateau_factor < 1, f"{key}.plateau_factor", "must be in (0, 1)")
        _check(0 <= self.ema_decay < 1, f"{key}.ema_decay", "must be in [0, 1)")


@dataclass
class TrainConfig:
    """The training loop: length, precision, checkpointing, validation, fault tolerance."""

    name: str = "run"  # the run lives in <runs_dir>/<name>/
    runs_dir: str = "runs"
    max_steps: int = 1000  # optimizer steps
    grad_accum: int = 1
    mixed_precision: Literal["no", "fp32", "bf16", "fp16"] = "no"  # fp32 is a synonym of no (stored as no)
    activation_checkpointing: Literal["none", "blocks", "every_n"] = "none"
    checkpointing_every_n: int = 2  # with activation_checkpointing: every_n, wrap every n-th block
    checkpoint_every: int = 500  # optimizer steps between checkpoints
    keep_last: int = 3  # checkpoints kept on disk
    val_every: int = 500
    val_batches: int = 0  # batches per validation; 0 = the whole validation split
    seed: int = 0
    auto_fit: bool = False  # on CUDA OOM halve the micro-batch and double grad_accum, then retry
    max_nonfinite_steps: int = 5  # consecutive skipped (non-finite) steps before the run stops
    sample_log: bool = False  # <run_dir>/samples.jsonl: the sample keys and crop offsets of every step

    def __post_init__(self) -> None:
        if self.mixed_precision == "fp32":
            self.mixed_precision = "no"

    def validate(self, key: str) -> None:
        _check(bool(self.name) and "/" not in self.name, f"{key}.name", "must be a non-empty name without '/'")
        for name in ("max_steps", "grad_accum", "checkpoint_every", "keep_last", "val_every",
                     "checkpointing_every_n", "max_nonfinite_steps"):
            _check(getattr(self, name) > 0, f"{key}.{name}", "must be > 0")
        _check(self.val_batches >= 0, f"{key}.val_batches", "must be >= 0")


# Accelerate trackers dist_audio sets up (name in log.trackers -> the module that must be importable).
# Each keeps its files under the run directory unless its own environment variables say otherwise:
# tb/ (TensorBoard), mlflow.db + mlflow-artifacts/ (MLflow, unless MLFLOW_TRACKING_URI), wandb/
# (W&B; WANDB_MODE=offline needs no network), .aim/ (Aim).
TRACKER_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "aim": "aim"}
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny sqlalchemy alembic",
                    "wandb": "wandb", "aim": "aim"}


@dataclass
class LogConfig:
    """What goes to the experiment trackers and the console."""

    every: int = 10  # steps between scalar logs
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # every one gets the same scalars
    audio_seconds: float = 2.0  # audio (and its figures) written to TensorBoard at each validation
    progress_bar: bool = True

    def validate(self, key: str) -> None:
        _check(self.every > 0, f"{key}.every", "must be > 0")
        _check(self.audio_seconds >= 0, f"{key}.audio_seconds", "must be >= 0")
        for name in self.trackers:
            _check(name in TRACKER_MODULES, f"{key}.trackers",
                   f"unknown tracker {name!r}; choose from {list(TRACKER_MODULES)}")
        _check(len(set(self.trackers)) == len(self.trackers), f"{key}.trackers", "names a tracker twice")

    def check_installed(self) -> None:
        """Every tracker named can be imported here: checked before training (not on every load, so a
        model trained with W&B still loads for inference where W&B is not installed)."""
        for name in self.trackers:
            _check(importlib.util.find_spec(TRACKER_MODULES[name]) is not None, "log.trackers",
                   f"tracker {name!r} is not installed (pip install {TRACKER_PACKAGES[name]}); "
                   "install it or remove it from log.trackers")


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.train.runs_dir) / self.train.name

    def validate(self) -> None:
        for section in ("model", "data", "optim", "train", "log"):
            getattr(self, section).validate(section)
        expected = "autoregressive" if self.model.name == "sashimi" else "separation"
        _check(self.data.task == expected, "data.task", f"model '{self.model.name}' trains on '{expected}' data")
        if isinstance(self.model, SashimiConfig):
            _check(self.data.bits == self.model.bits, "data.bits", f"must equal model.bits ({self.model.bits})")
        else:
            _check(self.data.sources == self.model.sources, "data.sources",
                   f"must equal model.sources ({self.model.sources})")


# --------------------------------------------------------------------------------------------------
# loading, overrides, type conversion
# --------------------------------------------------------------------------------------------------


def load_config(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, check_data: bool = False
) -> RunConfig:
    """Read a YAML run config, apply ``key=value`` overrides, convert types and validate.

    With ``check_data`` the shard location is opened too: it must exist with a manifest whose
    sample rate, channels, stems and chunk length suit the model and segment length.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError("", f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError("", f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    cfg = config_from_dict(raw)
    if check_data:
        from dist_audio.data.manifest import check_data_compatible  # the data package imports this module

        check_data_compatible(cfg)
    return cfg


def apply_override(raw: dict, item: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as a YAML scalar or list."""
    if "=" not in item:
        raise ConfigError(item, "an override must look like key.path=value")
    key, _, text = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(key, "empty component in the key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(key, f"cannot parse value {text!r}: {err}") from None
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is a value, not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build and validate a ``RunConfig`` from plain data (YAML or a checkpoint's saved config)."""
    raw = dict(raw)
    model_raw = raw.get("model")
    if not isinstance(model_raw, dict):
        raise ConfigError("model", "required section (with model.name: " + " | ".join(MODEL_CONFIGS) + ")")
    name = model_raw.get("name")
    if name not in MODEL_CONFIGS:
        raise ConfigError("model.name", f"must be one of {sorted(MODEL_CONFIGS)}, got {name!r}")
    raw["model"] = _build_dataclass(MODEL_CONFIGS[name], model_raw, "model")
    if isinstance(raw.get("log"), dict) and "tensorboard" in raw["log"]:
        raw["log"] = _legacy_tensorboard_key(raw["log"])
    cfg = _build_dataclass(RunConfig, raw, "", prebuilt={"model"})
    cfg.validate()
    return cfg


def _legacy_tensorboard_key(log: dict[str, Any]) -> dict[str, Any]:
    """``log.tensorboard: true | false`` (configs and checkpoints before ``log.trackers``, or a
    ``--set log.tensorboard=false``) adds TensorBoard to ``log.trackers`` or takes it out."""
    log = dict(log)
    enabled = log.pop("tensorboard")
    if not isinstance(enabled, bool):
        raise ConfigError("log.tensorboard", f"expected true or false, got {enabled!r} (better: log.trackers)")
    trackers = [name for name in log.get("trackers", ["tensorboard"]) if name != "tensorboard"]
    log["trackers"] = ["tensorboard", *trackers] if enabled else trackers
    return log


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _build_dataclass(cls: type, raw: Any, key: str, prebuilt: set[str] = frozenset()) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(key, f"expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{key}.{unknown[0]}" if key else unknown[0]
        raise ConfigError(where, f"unknown key; known keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in raw.items():
        sub = f"{key}.{name}" if key else name
        kwargs[name] = value if name in prebuilt else _convert(value, hints[name], sub)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{key}.{missing[0]}" if key else missing[0], "required key is missing")
    return cls(**kwargs)


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value if value is not None else {}, key)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"{value!r} matches none of the allowed types")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads no/off/yes/on as booleans
            value = next((word for word in _YAML_BOOL_WORDS[value] if word in args), value)
        if value not in args:
            raise ConfigError(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(key, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(key, f"expected a string, got {type(value).__name__} {value!r}")
        return str(value)
    raise ConfigError(key, f"unsupported config type {tp!r}")  # a bug in a dataclass declaration


_YAML_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)
