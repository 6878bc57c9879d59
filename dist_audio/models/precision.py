"""What a model computes in float32 whatever precision it is trained in.

bf16 (or fp16) reaches a model in three ways, and the model must give the same numbers under all of them:

- autocast (DDP, one device): parameters stay fp32, matmuls and convs run in bf16;
- low-precision parameters with an fp32 master copy in the optimizer (DeepSpeed bf16 / fp16): every
  parameter the module holds is bf16, and inputs arrive as the data loader made them (fp32);
- FSDP2's ``MixedPrecisionPolicy``: each sharding unit is all-gathered in its own ``param_dtype``, so
  the modules a model names in ``fp32_classes`` keep fp32 parameters while the rest run in bf16.

So a model marks its float32 *islands* with ``float32`` (autocast off inside, floating inputs upcast)
and reads its parameters through ``as_float32`` there; everything outside the islands computes in the
dtype of the parameters it meets (``like_parameter``). Complex arithmetic, FFTs and STFTs have no
half-precision kernels, and log-sum-exp over thousands of levels or an SSM kernel raised to the
10^4-th power lose everything in 8 mantissa bits, so those are the islands.

Models also declare ``fp32_classes``: module classes whose *parameters* must stay fp32 where the engine
allows it (FSDP2 does; DeepSpeed casts every parameter of the module it wraps, and the islands then
compute in fp32 from bf16-rounded values, see docs/strategies.md). Nothing here imports an engine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

__all__ = ["as_float32", "float32", "like_parameter"]

F = TypeVar("F", bound=Callable[..., Any])


def _device_type(values: tuple[Any, ...]) -> str:
    """The device type of the first tensor (or module parameter) among ``values``; CPU when none."""
    for value in values:
        if isinstance(value, Tensor):
            return value.device.type
        if isinstance(value, nn.Module):
            for param in value.parameters():
                return param.device.type
    return "cpu"


def _upcast(value: Any) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != torch.float64:
        return value.float()
    return value


def float32(fn: F) -> F:
    """Run ``fn`` as a float32 island: autocast disabled, floating tensor arguments (not float64) upcast.

    Parameters read inside are not touched: read them through ``as_float32``.
    """

    @functools.wraps(fn)
    def island(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(_device_type(args + tuple(kwargs.values())), enabled=False):
            return fn(*(_upcast(a) for a in args), **{k: _upcast(v) for k, v in kwargs.items()})

    return island  # type: ignore[return-value]


def as_float32(tensor: Tensor) -> Tensor:
    """``tensor`` in float32 (float64 kept): a no-op for fp32 parameters, an upcast for bf16 ones.

    Gradients flow back to the parameter in its own dtype.
    """
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def like_parameter(x: Tensor, param: Tensor) -> Tensor:
    """``x`` in the dtype of ``param``, for an op that needs matching dtypes (a conv after a float32
    island under bf16 parameters); under autocast ``x`` is left alone, as autocast picks the op's dtype."""
    if x.dtype == param.dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(param.dtype)
