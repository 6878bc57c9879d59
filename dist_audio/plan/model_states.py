"""Model-state memory per GPU (parameters, gradients, optimizer states) for each distribution strategy.

These terms do not depend on the batch: they follow from the parameter count, the precision and how
each engine lays out and shards its tensors. The parameter count comes from the real model built on
the meta device, so nothing is allocated however large the model is.

Bytes per parameter, ``P`` parameters, ``N`` ranks, ``w`` working-weight bytes (4 in fp32; 2 under
DeepSpeed bf16, which keeps bf16 weights and a separate fp32 master copy), ``c`` compute bytes of an
all-gathered FSDP unit (2 in bf16, 4 in fp32), ``U`` parameters of the largest block (one FSDP unit
or one gathered ZeRO-3 module), ``R`` parameters outside any block (FSDP's root unit), ``S``
parameters in tensors too small for ZeRO-3 to partition (``stage3_param_persistence_threshold``):

=============  ==========================  ==================================  ==============  ===============
strategy       parameters                  gradients (+ fixed buffers)         optimizer       host (per rank)
=============  ==========================  ==================================  ==============  ===============
ddp            4P                          4P (+ 4P DDP buckets if N > 1)      8P              0
zero2          wP                          wP/N [+ 4P/N] (+ w·bucket)          12P/N           0
zero3          w(S + (P-S)/N) + 2wU        wP/N [+ 4P/N] (+ w·bucket)          12P/N           0
zero3_offload  wS + 2wU                    (w·bucket)                          0               w(P-S)/N + 16P/N
fsdp           4P/N + c(R + 2U)            4P/N (+ 4(R + U) unsharded)         8P/N            0
fsdp_offload   c(R + 2U)                   (4(R + U) unsharded)                0               16P/N
=============  ==========================  ==================================  ==============  ===============

``[+ 4P/N]`` is DeepSpeed's fp32 gradient partition under bf16; ``bucket`` is DeepSpeed's reduce
bucket (``reduce_bucket_size`` elements, at most ``P``); ``2U`` is the block being computed plus the
one prefetched. Under FSDP2 bf16 the model's ``fp32_classes`` are units of their own gathered in fp32;
they are counted at ``c`` here (SaShiMi's SSM kernels: 5 % of its parameters). What the engines do to
activations under bf16 is traced, not modelled (``trace.BF16_AS``, ``BF16_AS`` below).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

STRATEGIES = ("ddp", "zero2", "zero3", "zero3_offload", "fsdp", "fsdp_offload")
PRECISIONS = ("fp32", "bf16")
OFFLOAD_STRATEGIES = ("zero3_offload", "fsdp_offload")
# How bf16 reaches the model under each engine (``trace.BF16_AS``): Accelerate's autocast for DDP,
# bf16 parameters (module.bfloat16()) under DeepSpeed, per-unit MixedPrecisionPolicy under FSDP2.
BF16_AS = {"ddp": "autocast", "zero2": "parameters", "zero3": "parameters", "zero3_offload": "parameters",
           "fsdp": "fsdp2", "fsdp_offload": "fsdp2"}

# DeepSpeed defaults (Accelerate leaves them at DeepSpeed's values for models without a HF config).
DEEPSPEED_PERSISTENCE_THRESHOLD = 100_000  # parameters with fewer elements stay whole on every rank
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # elements in the gradient reduce bucket


@dataclass(frozen=True)
class ParamLayout:
    """How a model's parameters are grouped, as far as sharding engines care."""

    total: int  # all parameters
    largest_unit: int  # parameters of the largest block (FSDP unit, ZeRO-3 gathered module)
    root: int  # parameters outside every block (FSDP's root unit stays unsharded)
    persistent: int  # parameters in tensors below DeepSpeed's persistence threshold
    units: int  # number of blocks


def param_layout(model: nn.Module, persistence_threshold: int = DEEPSPEED_PERSISTENCE_THRESHOLD) -> ParamLayout:
    """Count parameters per block of ``model`` (meta or fake tensors are fine: only shapes are read).

    The blocks are the units the trainer checkpoints and shards (``block_modules``).
    """
    from dist_audio.train.parallelize import block_modules

    units = block_modules(model)
    params = list(model.parameters())
    in_units = {id(p) for unit in units for p in unit.parameters()}
    return ParamLayout(
        total=sum(p.numel() for p in params),
        largest_unit=max((sum(p.numel() for p in unit.parameters()) for unit in units), default=0),
        root=sum(p.numel() for p in params if id(p) not in in_units),
        persistent=sum(p.numel() for p in params if p.numel() < persistence_threshold),
        units=len(units),
    )


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU of one strategy's model states; ``grads`` builds up during backward."""

    params: float  # present all step long
    grads: float  # present once backward has produced every gradient
    grad_buffers: float  # communication/unsharded gradient buffers present all through backward
    optimizer: float  # present all step long (from the second step on)
    host: float  # bytes of host memory per rank (offload only)


def model_states(strategy: str, precision: str, layout: ParamLayout, world_size: int,
                 reduce_bucket: int = DEEPSPEED_REDUCE_BUCKET) -> ModelStates:
    """Model-state bytes per GPU for ``strategy`` at ``precision`` on ``world_size`` ranks (see the table)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    P, N = layout.total, world_size
    U, R, S = layout.largest_unit, layout.root, layout.persistent
    w = 2 if precision == "bf16" else 4  # DeepSpeed working weights
    c = 2 if precision == "bf16" else 4  # FSDP all-gather (param_dtype)
    fp32_grad_partition = 4 * P / N if precision == "bf16" else 0.0
    bucket = w * min(reduce_bucket, P)
    if strategy == "ddp":
        return ModelStates(params=4 * P, grads=4 * P, grad_buffers=4 * P if N > 1 else 0.0,
                           optimizer=8 * P, host=0.0)
    if strategy == "zero2":
        return ModelStates(params=w * P, grads=w * P / N + fp32_grad_partition, grad_buffers=bucket,
                           optimizer=12 * P / N, host=0.0)
    if strategy == "zero3":
        return ModelStates(params=w * (S + (P - S) / N) + 2 * w * U, grads=w * P / N + fp32_grad_partition,
                           grad_buffers=bucket, optimizer=12 * P / N, host=0.0)
    if strategy == "zero3_offload":
        return ModelStates(params=w * S + 2 * w * U, grads=0.0, grad_buffers=bucket, optimizer=0.0,
                           host=w * (P - S) / N + 16 * P / N)
    if strategy == "fsdp":
        return ModelStates(params=4 * P / N + c * (R + 2 * U), grads=4 * P / N, grad_buffers=4 * (R + U),
                           optimizer=8 * P / N, host=0.0)
    return ModelStates(params=c * (R + 2 * U), grads=0.0, grad_buffers=4 * (R + U), optimizer=0.0,
                       host=16 * P / N)
