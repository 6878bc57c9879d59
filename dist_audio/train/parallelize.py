"""Apply the distribution strategy named by the Accelerate config file, in one fixed order.

Order (as in torchtitan's ``parallelize``): activation checkpointing of the model's blocks, then
sharding, then ``accelerator.prepare``. The strategy itself is chosen by the file given to
``accelerate launch --config_file configs/accelerate/<strategy>.yaml``; nothing here branches on the
run config except for precision, accumulation and checkpointing.

Accelerate maps FSDP only onto accelerator devices: on CPU it silently trains unsharded. Here an FSDP
launch on CPU is detected and FSDP2 is applied by hand with ``fully_shard`` (one unit per model block,
plus the root), so CPU runs shard exactly as requested. ``StrategyInfo`` reports what is really in
effect; a requested strategy that cannot be applied raises ``StrategyError``. ``full_state_dict``
gathers whole weights back from any strategy's sharding (for previews during training).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import (
    DeepSpeedPlugin,
    DistributedType,
    FullyShardedDataParallelPlugin,
    InitProcessGroupKwargs,
    ProjectConfiguration,
)
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

from dist_audio.config import TrainConfig

__all__ = [
    "StrategyError",
    "StrategyInfo",
    "apply_activation_checkpointing",
    "block_modules",
    "load_training_state",
    "make_accelerator",
    "plain_name",
    "save_training_state",
    "setup_model_and_optimizer",
]

# Sub-directory of a checkpoint holding the hand-applied FSDP2 model + optimizer (torch.distributed.checkpoint).
FSDP_STATE_DIR = "fsdp2_state"


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
# accelerator
# --------------------------------------------------------------------------------------------------


def make_accelerator(train_cfg: TrainConfig, micro_batch_size: int, *, grad_clip: float = 0.0,
                     tensorboard: bool = True) -> Accelerator:
    """The run's ``Accelerator``: strategy from the launch config, precision and accumulation from
    ``train_cfg``; the gloo backend when there is no GPU.

    Trackers log under ``<runs_dir>/<name>/``: ``accelerator.init_trackers("tb")`` writes TensorBoard
    events to ``<runs_dir>/<name>/tb/``. ``micro_batch_size`` (per rank) and ``grad_clip`` fill the
    DeepSpeed config, whose engine clips gradients itself (``accelerator.clip_grad_norm_`` then only
    reports the norm).
    """
    on_cpu = not torch.cuda.is_available()
    run_dir = Path(train_cfg.runs_dir) / train_cfg.name
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    kwargs_handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu and launched else []
    deepspeed_plugin = None
    use_deepspeed = _env_flag("ACCELERATE_USE_DEEPSPEED")
    if use_deepspeed:
        if on_cpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        deepspeed_plugin = DeepSpeedPlugin(gradient_accumulation_steps=train_cfg.grad_accum,
                                           gradient_clipping=grad_clip)  # 0 = off
        ds_config = deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = micro_batch_size
        ds_config["train_batch_size"] = "auto"
        ds_config["gradient_clipping"] = grad_clip  # always explicit: DeepSpeed's own default is 1.0
        if deepspeed_plugin.offload_optimizer_device not in (None, "none"):
            # Our AdamW param groups are a torch optimizer; DeepSpeed runs it on the offloaded fp32 states.
            ds_config["zero_force_ds_cpu_optimizer"] = False
    return Accelerator(
        # Without a GPU, Accelerate sets up multi-process CPU training only when told cpu=True; DeepSpeed
        # instead runs on its CPU accelerator (DS_ACCELERATOR=cpu) and must not be told.
        cpu=on_cpu and not use_deepspeed,
        mixed_precision=train_cfg.mixed_precision,
        gradient_accumulation_steps=train_cfg.grad_accum,
        deepspeed_plugin=deepspeed_plugin,
        log_with="tensorboard" if tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
        kwargs_handlers=kwargs_handlers,
    )


# --------------------------------------------------------------------------------------------------
# model + optimizer under the strategy
# --------------------------------------------------------------------------------------------------


@dataclass
class StrategyInfo:
    """What is really in effect on this rank (printed once at start, logged as hparams)."""

    distributed_type: str  # NO | MULTI_CPU | MULTI_GPU | DEEPSPEED | FSDP | FSDP2 (fully_shard)
    world_size: int
    zero_stage: int | None  # DeepSpeed only
    sharded_params: bool  # parameters partitioned across ranks (ZeRO-3, FSDP)
    offload_params: bool
    offload_optimizer: bool
    precision: str
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
            f"precision: {self.precision}",
            f"activation checkpointing: {self.activation_checkpointing} "
            f"({self.blocks_checkpointed} of {self.blocks_total} blocks)",
        ]


def setup_model_and_optimizer(
    accelerator: Accelerator,
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    train_cfg: TrainConfig,
) -> tuple[nn.Module, torch.optim.Optimizer, StrategyInfo]:
    """Checkpoint activations, shard, and prepare; ``make_optimizer(model)`` is called after sharding
    (FSDP2 replaces parameters with DTensors), so it must build its groups from ``model.param_groups``.

    Returns the model to call, the optimizer to step and what is in effect. Save and restore the
    pair with ``save_training_state`` / ``load_training_state`` (or ``accelerator.save_state``).
    """
    blocks_total = len(block_modules(model))
    wrapped = apply_activation_checkpointing(model, train_cfg.activation_checkpointing,
                                             train_cfg.checkpointing_every_n)
    fsdp_requested = _env_flag("ACCELERATE_USE_FSDP")
    deepspeed_requested = _env_flag("ACCELERATE_USE_DEEPSPEED")
    kind = accelerator.distributed_type
    if deepspeed_requested and kind != DistributedType.DEEPSPEED:
        raise StrategyError(f"the launch config asks for DeepSpeed but Accelerate set up {kind.value}")
    offload_params = offload_optimizer = False
    zero_stage = None
    if fsdp_requested and kind != DistributedType.FSDP:
        model, optimizer, offload_params = _fully_shard_by_hand(accelerator, model, make_optimizer)
        offload_optimizer = offload_params
        kind_name = "FSDP2 (fully_shard)"
    else:
        if kind == DistributedType.FSDP:
            plugin = accelerator.state.fsdp_plugin
            if plugin.fsdp_version != 2:
                raise StrategyError("set fsdp_version: 2 in the Accelerate config (FSDP1 is not supported)")
            # auto-wrap by the model's own block classes (the config file cannot know them);
            # Accelerate turns the policy into a callable inside prepare()
            plugin.transformer_cls_names_to_wrap = sorted({type(_unwrap_ac(b)).__name__
                                                           for b in block_modules(model)})
            plugin.auto_wrap_policy = transformer_auto_wrap_policy
            offload_params = offload_optimizer = _fsdp_offloads(plugin)
        optimizer = make_optimizer(model)
        model, optimizer = accelerator.prepare(model, optimizer)
        if kind == DistributedType.DEEPSPEED:
            zero = accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
            zero_stage = int(zero.get("stage", 0))
            offload_params = zero.get("offload_param", {}).get("device", "none") not in ("none", None)
            offload_optimizer = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
            if offload_params and zero_stage != 3:
                raise StrategyError("parameter offload needs ZeRO stage 3")
        kind_name = kind.value
    on_rank, total = _parameter_counts(model)
    info = StrategyInfo(
        distributed_type=kind_name,
        world_size=accelerator.num_processes,
        zero_stage=zero_stage,
        sharded_params=on_rank < total,
        offload_params=offload_params,
        offload_optimizer=offload_optimizer,
        precision=accelerator.mixed_precision,
        activation_checkpointing=train_cfg.activation_checkpointing,
        blocks_checkpointed=wrapped,
        blocks_total=blocks_total,
        params_on_rank=on_rank,
        params_total=total,
    )
    return model, optimizer, info


def _fully_shard_by_hand(accelerator: Accelerator, model: nn.Module,
                         make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]):
    """FSDP2 where Accelerate will not apply it (CPU): ``fully_shard`` each block, then the root.

    The model is not passed to ``accelerator.prepare`` (that would wrap it in DDP); the optimizer gets
    Accelerate's wrapper so gradient accumulation skips steps as usual, and model + optimizer are
    saved through pre-hooks of ``accelerator.save_state`` / ``load_state`` with
    ``torch.distributed.checkpoint`` (each rank writes its own shards).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if accelerator.num_processes < 2 or not torch.distributed.is_initialized():
        raise StrategyError("FSDP needs a multi-process launch (accelerate launch --num_processes >= 2)")
    plugin = FullyShardedDataParallelPlugin()  # reads the launch config from the environment
    if plugin.fsdp_version != 2:
        raise StrategyError("set fsdp_version: 2 in the Accelerate config (FSDP1 is not supported)")
    if accelerator.mixed_precision == "fp16":
        raise StrategyError("fp16 is not supported with FSDP on CPU; use bf16 or no")
    offload = _fsdp_offloads(plugin)
    options = {"reshard_after_forward": plugin.reshard_after_forward is not False}
    if offload:  # pinned host memory only helps (and only exists) with a GPU
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    if accelerator.mixed_precision == "bf16":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    options["mesh"] = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    for block in block_modules(model):
        fully_shard(block, **options)
    fully_shard(model, **options)
    optimizer = make_optimizer(model)
    _register_sharded_state_hooks(accelerator, model, optimizer)
    return model, AcceleratedOptimizer(optimizer, device_placement=False, scaler=None), offload


def _register_sharded_state_hooks(accelerator: Accelerator, model: nn.Module,
                                  optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def save_hook(models, weights, output_dir):
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=Path(output_dir) / FSDP_STATE_DIR)

    def load_hook(models, input_dir):
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=Path(input_dir) / FSDP_STATE_DIR)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_training_state(accelerator: Accelerator, directory: str | Path) -> None:
    """Model, optimizer, scaler, RNG and registered objects under the active strategy (collective:
    call on every rank). DDP: ``model.safetensors`` + ``optimizer.bin``; DeepSpeed: its engine
    checkpoint under ``pytorch_model/``; hand-applied FSDP2: ``fsdp2_state/`` (torch.distributed.checkpoint)."""
    accelerator.save_state(str(directory))
    accelerator.wait_for_everyone()


def load_training_state(accelerator: Accelerator, directory: str | Path) -> None:
    """Restore what ``save_training_state`` wrote, under the same strategy and world size."""
    accelerator.load_state(str(directory))
    accelerator.wait_for_everyone()


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


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _fsdp_offloads(plugin: FullyShardedDataParallelPlugin) -> bool:
    """FSDP2 plugins hold an ``OffloadPolicy`` (no offload) or its ``CPUOffloadPolicy`` subclass."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    return isinstance(plugin.cpu_offload, CPUOffloadPolicy) or plugin.cpu_offload is True


def _unwrap_ac(module: nn.Module) -> nn.Module:
    return module._checkpoint_wrapped_module if isinstance(module, CheckpointWrapper) else module


def _parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(elements stored on this rank, elements in the full model) for plain, ZeRO-3 and DTensor params."""
    on_rank = total = 0
    for param in model.parameters():
        if hasattr(param, "ds_tensor"):  # DeepSpeed ZeRO-3 partition
            on_rank += param.ds_tensor.numel()
            total += param.ds_numel
        elif hasattr(param, "to_local"):  # FSDP2 DTensor shard
            on_rank += param.to_local().numel()
            total += param.numel()
        else:
            on_rank += param.numel()
            total += param.numel()
    return on_rank, total


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole weights on the main process, on the CPU (empty elsewhere). Collective: call it
    on every rank. ZeRO-3 partitions are gathered with DeepSpeed's ``GatheredParameters``; FSDP2
    DTensors and replicated parameters through ``torch.distributed.checkpoint``'s full state dict."""
    module = accelerator.unwrap_model(model)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            if not accelerator.is_main_process:
                return {}
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    weights = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return weights if accelerator.is_main_process else {}
