"""Apply the distribution strategy named by the Accelerate config file, in one fixed order, on any device.

Order (as in torchtitan's ``parallelize``): activation checkpointing of the model's blocks, then
sharding, then ``accelerator.prepare``. The strategy is chosen by the file given to ``accelerate launch
--config_file configs/accelerate/<strategy>.yaml`` and read once into a ``LaunchStrategy``:

- single device / DDP: ``accelerator.prepare`` (autocast for bf16/fp16, DDP across processes);
- DeepSpeed ZeRO-2/3 (± offload): ``accelerator.prepare`` builds the engine (bf16/fp16 parameters with an
  fp32 master copy, DeepSpeed's CPU Adam when the optimizer is offloaded);
- FSDP2: always dist_audio's own ``shard_with_fsdp2`` (``fully_shard`` per float32 module and per block,
  then the root, with per-unit ``MixedPrecisionPolicy`` and ``CPUOffloadPolicy``), never Accelerate's FSDP
  plugin, so the code that shards on a CPU test is the code that shards on a GPU. Accelerate then runs
  as for DDP (process group, reduce, gather) without touching the model.

Everything that moves tensors between ranks does it on ``comm_device`` (the accelerator's device), also
for state that lives on the CPU (offloaded shards, EMA): the same call works over gloo and NCCL.
``StrategyInfo`` reports what is really in effect; a strategy that cannot be applied raises
``StrategyError``. ``state_holder`` gives checkpoints one portable layout for every strategy
(``portable_state``).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs, ProjectConfiguration
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)
from torch.distributed.tensor import DTensor

from dist_audio.config import ConfigError, TrainConfig
from dist_audio.train.portable_state import MOMENTS, StateHolder, gather_full, shard_rows

__all__ = [
    "LaunchStrategy",
    "StrategyError",
    "StrategyInfo",
    "apply_activation_checkpointing",
    "block_modules",
    "check_precision_supported",
    "clip_grad_norm",
    "fsdp2_policies",
    "load_loss_scale_state",
    "loss_scale_state",
    "make_accelerator",
    "plain_name",
    "setup_model_and_optimizer",
    "shard_with_fsdp2",
    "state_holder",
    "unwrap_model",
]

HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class StrategyError(RuntimeError):
    """The launch asked for a strategy this process cannot apply."""


# --------------------------------------------------------------------------------------------------
# activation checkpointing
# --------------------------------------------------------------------------------------------------


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The outermost instances of ``model.block_classes`` in module order (checkpoint wrappers count
    as the block they wrap), i.e. the units for activation checkpointing and FSDP."""
    block_classes = tuple(getattr(model, "block_classes", ()))
    if not block_classes:
        raise StrategyError(f"{type(model).__name__} names no block_classes to checkpoint or shard")
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            inner = child._checkpoint_wrapped_module if isinstance(child, CheckpointWrapper) else child
            if isinstance(inner, block_classes):
                found.append(child)
            else:
                visit(child)

    visit(model)
    return found


def fp32_modules(model: nn.Module) -> list[nn.Module]:
    """Instances of ``model.fp32_classes``: modules whose parameters stay float32 (``models.precision``)."""
    classes = tuple(getattr(model, "fp32_classes", ()))
    return [m for m in model.modules() if classes and isinstance(m, classes)]


def apply_activation_checkpointing(model: nn.Module, mode: str, every_n: int = 2) -> int:
    """Wrap the model's blocks so their activations are recomputed in backward; returns how many.

    ``mode``: ``none``, ``blocks`` (every block) or ``every_n`` (blocks 0, n, 2n, ...). Non-reentrant
    ``torch.utils.checkpoint`` via ``checkpoint_wrapper``: the wrapped block is still called through
    its own ``__call__`` in the recompute, so DeepSpeed ZeRO-3 and FSDP hooks gather its parameters,
    and parameter names / state-dict keys stay those of the unwrapped model.
    """
    if mode not in ("none", "blocks", "every_n"):
        raise ValueError(f"activation checkpointing mode must be none|blocks|every_n, got {mode!r}")
    if mode == "none":
        return 0
    if every_n < 1:
        raise ValueError(f"every_n must be >= 1, got {every_n}")
    step = 1 if mode == "blocks" else every_n
    chosen = {id(b) for i, b in enumerate(block_modules(model)) if i % step == 0
              and not isinstance(b, CheckpointWrapper)}
    wrapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in chosen:
                setattr(parent, name, checkpoint_wrapper(child, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
                wrapped += 1
    return wrapped


# --------------------------------------------------------------------------------------------------
# the launch strategy and the accelerator
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchStrategy:
    """What the Accelerate config file asked for, as ``accelerate launch`` exports it to the workers."""

    name: str  # single | ddp | deepspeed | fsdp2
    offload: bool = False  # fsdp2: parameters, gradients and the optimizer step on the CPU
    reshard_after_forward: bool = True  # fsdp2

    @classmethod
    def from_environment(cls) -> LaunchStrategy:
        if _env_flag("ACCELERATE_USE_DEEPSPEED"):
            return cls("deepspeed")
        if _env_flag("ACCELERATE_USE_FSDP"):
            if os.environ.get("FSDP_VERSION", "1") != "2":
                raise StrategyError("set fsdp_version: 2 in the Accelerate config (FSDP1 is not supported)")
            return cls("fsdp2", offload=_env_flag("FSDP_OFFLOAD_PARAMS"),
                       reshard_after_forward=os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
                       not in ("false", "0", "no"))
        return cls("ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single")


def check_precision_supported(train_cfg: TrainConfig, *, cuda: bool | None = None) -> None:
    """fp16 needs CUDA (loss-scaled half-precision training has no CPU kernels in the engines): refuse it
    up front as a config error rather than fail inside a worker."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if train_cfg.mixed_precision == "fp16" and not cuda:
        raise ConfigError("train.mixed_precision", "fp16 needs a CUDA GPU and none is visible; "
                                                   "use bf16 (or no) on this machine")


def make_accelerator(train_cfg: TrainConfig, strategy: LaunchStrategy, micro_batch_size: int, *,
                     grad_clip: float = 0.0, log_with: list[str] | None = None,
                     deepspeed_cpu_adam: bool = True) -> Accelerator:
    """The run's ``Accelerator``: precision and accumulation from ``train_cfg``, gloo without a GPU.

    Trackers log under ``<runs_dir>/<name>/`` (``init_trackers("tb")`` → ``<run>/tb/``). ``micro_batch_size``
    (per rank) and ``grad_clip`` fill the DeepSpeed config, whose engine clips gradients itself. Under
    FSDP2 Accelerate is set up as for DDP (its FSDP plugin would shard the model its own way on a GPU and
    not at all on a CPU); ``setup_model_and_optimizer`` shards instead.

    With a ZeRO optimizer offloaded to the CPU, Accelerate turns our torch AdamW into DeepSpeed's
    vectorised CPU Adam in AdamW mode, keeping its parameter groups; ``deepspeed_cpu_adam=False`` keeps
    torch's AdamW on the offloaded states instead (for comparison: ``bench/strategies.py``). Passing a
    ``DeepSpeedCPUAdam`` ourselves would be wrong: Accelerate 1.16 re-maps it with ``adamw_mode=False``.
    """
    check_precision_supported(train_cfg)
    on_cpu = not torch.cuda.is_available()
    run_dir = Path(train_cfg.runs_dir) / train_cfg.name
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    kwargs_handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu and launched else []
    deepspeed_plugin = None
    precision = train_cfg.mixed_precision
    if strategy.name == "deepspeed":
        if on_cpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        deepspeed_plugin = DeepSpeedPlugin(gradient_accumulation_steps=train_cfg.grad_accum,
                                           gradient_clipping=grad_clip)  # 0 = off
        ds_config = deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = micro_batch_size
        ds_config["train_batch_size"] = "auto"
        ds_config["gradient_clipping"] = grad_clip  # always explicit: DeepSpeed's own default is 1.0
        if not deepspeed_cpu_adam:
            ds_config["zero_force_ds_cpu_optimizer"] = False
        if precision != "no":  # reduce gradients in fp32, as every other strategy here does
            ds_config["communication_data_type"] = "fp32"
    elif strategy.name == "fsdp2" and precision == "bf16":
        precision = "no"  # MixedPrecisionPolicy casts per unit; Accelerate must not autocast as well
    with _hidden_env("ACCELERATE_USE_FSDP") if strategy.name == "fsdp2" else contextlib.nullcontext():
        accelerator = Accelerator(
            # Without a GPU, Accelerate sets up multi-process CPU training only when told cpu=True; DeepSpeed
            # instead runs on its CPU accelerator (DS_ACCELERATOR=cpu) and must not be told.
            cpu=on_cpu and strategy.name != "deepspeed",
            mixed_precision=precision,
            gradient_accumulation_steps=train_cfg.grad_accum,
            deepspeed_plugin=deepspeed_plugin,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
            kwargs_handlers=kwargs_handlers,
        )
    if strategy.name == "fsdp2" and accelerator.scaler is not None:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        # each rank sees only its gradient shards: the overflow check must agree across ranks
        accelerator.scaler = ShardedGradScaler(accelerator.device.type)
    return accelerator


@contextlib.contextmanager
def _hidden_env(name: str) -> Iterator[None]:
    value = os.environ.pop(name, None)
    try:
        yield
    finally:
        if value is not None:
            os.environ[name] = value


# --------------------------------------------------------------------------------------------------
# FSDP2
# --------------------------------------------------------------------------------------------------


def fsdp2_policies(mixed_precision: str, offload: bool, device: torch.device) -> dict[str, dict[str, Any]]:
    """``fully_shard`` keyword arguments for the three kinds of unit: ``fp32`` modules (the model's
    ``fp32_classes``), ``block`` and ``root``. Low-precision units all-gather their parameters in
    bf16/fp16; gradients are reduced in fp32; the root does not cast its inputs (the model's float32
    islands read the data at full precision). Offloaded shards are pinned when a GPU copies them."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    half = HALF_DTYPES.get(mixed_precision)
    offload_policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    block = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32) if half else MixedPrecisionPolicy()
    root = (MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32, cast_forward_inputs=False)
            if half else MixedPrecisionPolicy())
    return {kind: {"mp_policy": policy, "offload_policy": offload_policy}
            for kind, policy in (("fp32", fp32), ("block", block), ("root", root))}


def shard_with_fsdp2(model: nn.Module, mesh: Any, *, mixed_precision: str = "no", offload: bool = False,
                     reshard_after_forward: bool = True) -> None:
    """FSDP2 in place: one ``fully_shard`` unit per float32 module (only with a half precision, where
    they need their own policy), per block, then the root. Parameters become DTensors on ``mesh``."""
    from torch.distributed.fsdp import fully_shard

    policies = fsdp2_policies(mixed_precision, offload, torch.device(mesh.device_type))
    # Linear layers on [b, l, h] and reshapes return views; the objectives never modify outputs in place,
    # which is what this warning (raised at every forward) is about
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    if mixed_precision in HALF_DTYPES:
        for module in fp32_modules(model):
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, **policies["fp32"])
    for block in block_modules(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, **policies["block"])
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, **policies["root"])


def _fsdp2_mesh(accelerator: Accelerator) -> Any:
    """A 1-D mesh over every process on the accelerator's device (a one-process group when launched alone)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():  # `accelerate launch --num_processes 1` starts no process group
        backend = "nccl" if accelerator.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return init_device_mesh(accelerator.device.type, (dist.get_world_size(),))


# --------------------------------------------------------------------------------------------------
# model + optimizer under the strategy
# --------------------------------------------------------------------------------------------------


@dataclass
class StrategyInfo:
    """What is really in effect on this rank (printed once at start, logged as hparams)."""

    distributed_type: str  # NO | MULTI_CPU | MULTI_GPU | DEEPSPEED | FSDP2 (fully_shard)
    world_size: int
    zero_stage: int | None  # DeepSpeed only
    sharded_params: bool  # parameters partitioned across ranks (ZeRO-3, FSDP2)
    offload_params: bool
    offload_optimizer: bool
    precision: str  # train.mixed_precision: no | bf16 | fp16
    param_dtype: str  # how the parameters are stored, e.g. "bf16 + fp32 master copy"
    compute_dtype: str  # e.g. "bf16 (autocast)"
    reduce_dtype: str  # dtype of the gradient reduction across ranks
    fp32_modules: str  # modules whose parameters and computation stay fp32
    loss_scaling: str
    optimizer: str
    activation_checkpointing: str
    blocks_checkpointed: int
    blocks_total: int
    params_on_rank: int  # parameter elements this rank stores
    params_total: int

    def summary_lines(self) -> list[str]:
        stage = f", ZeRO stage {self.zero_stage}" if self.zero_stage is not None else ""
        offload = [name for name, on in (("params", self.offload_params),
                                         ("optimizer", self.offload_optimizer)) if on]
        share = self.params_on_rank / max(self.params_total, 1)
        return [
            f"strategy: {self.distributed_type}{stage}, world size {self.world_size}",
            f"parameters: {'sharded' if self.sharded_params else 'replicated'}; this rank holds "
            f"{self.params_on_rank:,} of {self.params_total:,} ({share:.1%})",
            f"offload to CPU: {', '.join(offload) if offload else 'nothing'}",
            f"precision: {self.precision}: parameters stored {self.param_dtype}, compute {self.compute_dtype}, "
            f"gradients reduced in {self.reduce_dtype}, loss scaling {self.loss_scaling}",
            f"kept in fp32: {self.fp32_modules}",
            f"optimizer: {self.optimizer}",
            f"activation checkpointing: {self.activation_checkpointing} "
            f"({self.blocks_checkpointed} of {self.blocks_total} blocks)",
        ]


def setup_model_and_optimizer(
    accelerator: Accelerator,
    strategy: LaunchStrategy,
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    train_cfg: TrainConfig,
) -> tuple[nn.Module, torch.optim.Optimizer, StrategyInfo]:
    """Checkpoint activations, shard, and prepare. ``make_optimizer(model)`` is called after sharding
    (FSDP2 replaces parameters with DTensors), so it must build its groups from ``model.param_groups``.

    Returns the model to call, the optimizer to step and what is in effect; checkpoint them through
    ``state_holder``.
    """
    blocks_total = len(block_modules(model))
    fp32_names = sorted({type(m).__name__ for m in fp32_modules(model)})
    fp32_count = len(fp32_modules(model))
    wrapped = apply_activation_checkpointing(model, train_cfg.activation_checkpointing,
                                             train_cfg.checkpointing_every_n)
    kind = accelerator.distributed_type
    precision = train_cfg.mixed_precision
    half = precision in HALF_DTYPES
    if strategy.name == "deepspeed" and kind != DistributedType.DEEPSPEED:
        raise StrategyError(f"the launch config asks for DeepSpeed but Accelerate set up {kind.value}")
    if strategy.name == "fsdp2":
        shard_with_fsdp2(model, _fsdp2_mesh(accelerator), mixed_precision=precision, offload=strategy.offload,
                         reshard_after_forward=strategy.reshard_after_forward)
        optimizer = AcceleratedOptimizer(make_optimizer(model), device_placement=False, scaler=accelerator.scaler)
        info = dict(distributed_type="FSDP2 (fully_shard)", zero_stage=None, offload_params=strategy.offload,
                    offload_optimizer=strategy.offload, param_dtype="fp32 shards",
                    compute_dtype=f"{precision} (all-gathered per unit)" if half else "fp32",
                    reduce_dtype="fp32", optimizer="torch AdamW on the fp32 shards"
                    + (" (CPU)" if strategy.offload else ""),
                    fp32=f"{', '.join(fp32_names)} ({fp32_count} units)" if half and fp32_names else "everything")
    elif strategy.name == "deepspeed":
        zero = accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
        zero_stage = int(zero.get("stage", 0))
        offload_params = zero.get("offload_param", {}).get("device", "none") not in ("none", None)
        offload_optimizer = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
        if offload_params and zero_stage != 3:
            raise StrategyError("parameter offload needs ZeRO stage 3")
        model, optimizer = accelerator.prepare(model, make_optimizer(model))
        basic = type(model.optimizer.optimizer).__name__
        info = dict(distributed_type=kind.value, zero_stage=zero_stage, offload_params=offload_params,
                    offload_optimizer=offload_optimizer,
                    param_dtype=f"{precision} + fp32 master copy" if half else "fp32",
                    compute_dtype=f"{precision} parameters" if half else "fp32",
                    reduce_dtype=_dtype_name(model.communication_data_type),
                    optimizer=f"{basic} on the fp32 partitions" + (" (CPU)" if offload_optimizer else ""),
                    fp32=(f"the float32 islands of {', '.join(fp32_names)} (their parameters are stored "
                          f"{precision}: DeepSpeed casts every parameter)") if half and fp32_names
                    else ("the float32 islands" if half else "everything"))
    else:
        model, optimizer = accelerator.prepare(model, make_optimizer(model))
        info = dict(distributed_type=kind.value, zero_stage=None, offload_params=False, offload_optimizer=False,
                    param_dtype="fp32", compute_dtype=f"{precision} (autocast)" if half else "fp32",
                    reduce_dtype="fp32", optimizer="torch AdamW",
                    fp32=(f"{', '.join(fp32_names)} and the float32 islands" if fp32_names else "the float32 islands")
                    if half else "everything")
    on_rank, total = _parameter_counts(model)
    scaling = ("none" if precision != "fp16" else
               "DeepSpeed dynamic loss scale" if strategy.name == "deepspeed" else type(accelerator.scaler).__name__)
    return model, optimizer, StrategyInfo(
        distributed_type=info["distributed_type"], world_size=accelerator.num_processes, zero_stage=info["zero_stage"],
        sharded_params=on_rank < total, offload_params=info["offload_params"],
        offload_optimizer=info["offload_optimizer"], precision=precision, param_dtype=info["param_dtype"],
        compute_dtype=info["compute_dtype"], reduce_dtype=info["reduce_dtype"], fp32_modules=info["fp32"],
        loss_scaling=scaling, optimizer=info["optimizer"], activation_checkpointing=train_cfg.activation_checkpointing,
        blocks_checkpointed=wrapped, blocks_total=blocks_total, params_on_rank=on_rank, params_total=total)


def clip_grad_norm(accelerator: Accelerator, model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to ``max_norm`` (inf: only measure it) and return it.

    FSDP2 gradients are DTensor shards, possibly on the CPU: their squared norms are summed locally and
    all-reduced on the accelerator's device. DeepSpeed clips inside its engine (this reports its norm);
    replicated gradients go through Accelerate (which also unscales fp16 gradients).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not params or not isinstance(params[0].grad, DTensor):
        norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        return math.nan if norm is None else float(norm)
    accelerator.unscale_gradients()
    local = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for param in params:
        local += param.grad.to_local().double().square().sum().to(accelerator.device)
    dist.all_reduce(local)
    norm = float(local.sqrt())
    if math.isfinite(norm) and norm > max_norm:
        coefficient = max_norm / (norm + 1e-6)
        for param in params:
            param.grad.to_local().mul_(coefficient)
    return norm


def loss_scale_state(accelerator: Accelerator, model: nn.Module) -> dict[str, Any]:
    """The fp16 loss scaler's state as plain numbers (empty without one): torch's GradScaler /
    ShardedGradScaler, or DeepSpeed's dynamic loss scaler. Strategy-independent, so it resumes anywhere."""
    if accelerator.scaler is not None:
        return {k: v for k, v in accelerator.scaler.state_dict().items() if isinstance(v, (int, float))}
    scaler = getattr(getattr(model, "optimizer", None), "loss_scaler", None)
    if scaler is None or not hasattr(scaler, "cur_iter"):  # DeepSpeed bf16/fp32: a static scale of 1
        return {}
    return {"scale": float(scaler.cur_scale), "cur_iter": int(scaler.cur_iter),
            "last_overflow_iter": int(scaler.last_overflow_iter), "cur_hysteresis": int(scaler.cur_hysteresis)}


def load_loss_scale_state(accelerator: Accelerator, model: nn.Module, state: dict[str, Any]) -> None:
    """Restore what ``loss_scale_state`` returned, into whichever scaler this run has."""
    if not state:
        return
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict({**accelerator.scaler.state_dict(), **state})
        return
    scaler = getattr(getattr(model, "optimizer", None), "loss_scaler", None)
    if scaler is not None and hasattr(scaler, "cur_iter"):
        scaler.cur_scale = state["scale"]
        for key in ("cur_iter", "last_overflow_iter", "cur_hysteresis"):
            if key in state:
                setattr(scaler, key, state[key])


# --------------------------------------------------------------------------------------------------
# the portable training state of each strategy
# --------------------------------------------------------------------------------------------------


class _TorchState(StateHolder):
    """One device, DDP and FSDP2: parameters and AdamW moments are the live (plain or DTensor) tensors,
    so loading fills them in place."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ema: Any | None):
        super().__init__(model, ema)
        self.optimizer = optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(plain_name(n), p) for n, p in unwrap_model(self.model).named_parameters() if p.requires_grad]

    def parameter_entries(self) -> dict[str, Tensor]:
        entries: dict[str, Tensor] = {}
        for name, param in self.named_parameters():
            entries[f"model/{name}"] = param.detach()
            state = self.optimizer.state.get(param, {})
            for moment in MOMENTS:
                entries[f"optim/{name}/{moment}"] = state[moment] if moment in state else torch.zeros_like(param)
        return entries

    def load_parameter_entries(self, entries: dict[str, Tensor]) -> None:
        """Nothing to write back: ``dcp.load`` filled the live tensors."""

    def prepare_load(self) -> None:
        for group in self.optimizer.param_groups:  # the states torch's AdamW creates at its first step
            for param in group["params"]:
                if not self.optimizer.state.get(param):
                    self.optimizer.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                                   "exp_avg_sq": torch.zeros_like(param)}

    def optimizer_steps(self) -> int:
        return max((int(s["step"]) for s in self.optimizer.state.values() if "step" in s), default=0)

    def set_optimizer_steps(self, steps: int) -> None:
        for state in self.optimizer.state.values():
            state["step"].fill_(steps)

    def full_weights(self, comm_device: torch.device) -> dict[str, Tensor]:
        return {name: gather_full(param.detach(), comm_device).float() for name, param in self.named_parameters()}


class _DeepSpeedState(StateHolder):
    """ZeRO-1/2/3 (± offload): each parameter's fp32 master weights and moments are regathered from
    DeepSpeed's partitions one at a time (``deepspeed.utils.safe_get_full_*``) and kept as dim-0 shards;
    loading writes them back into the partitions and the working (bf16 or fp32) copy."""

    def __init__(self, engine: nn.Module, ema: Any | None, comm_device: torch.device):
        super().__init__(engine, ema)
        self.engine, self.comm_device = engine, comm_device

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(plain_name(n), p) for n, p in self.engine.module.named_parameters() if p.requires_grad]

    @staticmethod
    def _shape(param: nn.Parameter) -> torch.Size:
        return param.ds_shape if hasattr(param, "ds_shape") else param.shape

    def full_parameter(self, param: nn.Parameter) -> Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param).reshape(self._shape(param))  # collective

    def parameter_entries(self) -> dict[str, Tensor]:
        from deepspeed.utils import safe_get_full_optimizer_state

        self._link_moments()
        entries: dict[str, Tensor] = {}
        for name, param in self.named_parameters():
            entries[f"model/{name}"] = shard_rows(self.full_parameter(param), self.comm_device)
            for moment in MOMENTS:
                full = safe_get_full_optimizer_state(param, moment).reshape(self._shape(param))
                entries[f"optim/{name}/{moment}"] = shard_rows(full, self.comm_device)
        return entries

    def load_parameter_entries(self, entries: dict[str, Tensor]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        for name, param in self.named_parameters():
            full = gather_full(entries[f"model/{name}"], self.comm_device).to(self.comm_device)
            safe_set_full_fp32_param(param, full)
            with torch.no_grad():
                if hasattr(param, "ds_tensor"):  # ZeRO-3: this rank's flat, padded partition
                    part = param.ds_tensor
                    start = dist.get_rank() * part.numel()
                    flat = torch.zeros(part.numel() * dist.get_world_size(), dtype=full.dtype, device=full.device)
                    flat[: full.numel()] = full.flatten()
                    part.copy_(flat[start:start + part.numel()])
                else:
                    param.copy_(full)
            for moment in MOMENTS:
                value = gather_full(entries[f"optim/{name}/{moment}"], self.comm_device).to(self.comm_device)
                safe_set_full_optimizer_state(param, value, moment)

    def _flat_partitions(self) -> list[Tensor]:
        """The fp32 master partitions the basic optimizer steps (one per parameter group)."""
        zero = self.engine.optimizer
        flat = getattr(zero, "fp32_partitioned_groups_flat", None)  # ZeRO-3
        return list(flat if flat is not None else zero.single_partition_of_fp32_groups)  # ZeRO-1/2

    def _link_moments(self) -> None:
        """DeepSpeed 0.19 links ZeRO-1/2 parameters to their moment fragments right after the first
        group's first step, before the other groups have moments, so only group 0's could be read;
        link again now that all exist (idempotent; ZeRO-3 looks its moments up on every call)."""
        zero = self.engine.optimizer
        if hasattr(zero, "single_partition_of_fp32_groups"):
            from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

            for params, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
                lazy_init_hp_params_optimizer_state(params, flat, zero.optimizer.state)

    def prepare_load(self) -> None:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        basic = self.engine.optimizer.optimizer
        cpu_adam = isinstance(basic, DeepSpeedCPUAdam)  # counts steps in a Python int
        for flat in self._flat_partitions():  # the moments the basic optimizer creates at its first step
            if not basic.state.get(flat):
                basic.state[flat] = {"step": 0 if cpu_adam else torch.tensor(0.0),
                                     "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        self._link_moments()

    def _optimizer_states(self) -> list[dict]:
        basic = self.engine.optimizer.optimizer
        return [basic.state[flat] for flat in self._flat_partitions() if basic.state.get(flat)]

    def optimizer_steps(self) -> int:
        return max((int(s["step"]) for s in self._optimizer_states() if "step" in s), default=0)

    def set_optimizer_steps(self, steps: int) -> None:
        for state in self._optimizer_states():
            if torch.is_tensor(state.get("step")):
                state["step"].fill_(steps)
            else:  # DeepSpeed's CPU Adam counts in a Python int
                state["step"] = steps

    def full_weights(self, comm_device: torch.device) -> dict[str, Tensor]:
        """The working weights, as fp32 (ZeRO-3: all partitions gathered in one collective)."""
        import deepspeed

        params = self.named_parameters()
        gathered = (deepspeed.zero.GatheredParameters([p for _, p in params]) if hasattr(params[0][1], "ds_id")
                    else contextlib.nullcontext())
        with gathered:
            return {name: param.detach().float().cpu().clone() for name, param in params}


def state_holder(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                 ema: Any | None = None) -> StateHolder:
    """The portable training state of a model prepared by ``setup_model_and_optimizer`` (see
    ``portable_state``). ``holder.full_weights(device)`` gives every rank the whole fp32 weights."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _DeepSpeedState(model, ema, accelerator.device)
    return _TorchState(model, optimizer, ema)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


WRAPPER_NAMES = {"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"}  # never model names


def plain_name(name: str) -> str:
    """A parameter / state-dict name as the plain model spells it: without DDP's leading ``module``
    and the names that checkpointing, compile and FSDP1 wrappers insert."""
    parts = name.split(".")
    if parts[0] == "module":
        parts = parts[1:]
    return ".".join(p for p in parts if p not in WRAPPER_NAMES)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DeepSpeed engine wrappers (FSDP2 shards in place: nothing to unwrap)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _dtype_name(dtype: torch.dtype | None) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}.get(dtype, str(dtype))


def _parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(elements stored on this rank, elements in the full model) for plain, ZeRO-3 and DTensor params."""
    on_rank = total = 0
    for param in model.parameters():
        if hasattr(param, "ds_tensor"):  # DeepSpeed ZeRO-3 partition
            on_rank += param.ds_tensor.numel()
            total += param.ds_numel
        elif isinstance(param, DTensor):  # FSDP2 shard
            on_rank += param.to_local().numel()
            total += param.numel()
        else:
            on_rank += param.numel()
            total += param.numel()
    return on_rank, total
