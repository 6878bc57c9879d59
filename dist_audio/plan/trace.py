"""Measure activation and temporary memory by tracing one real training step on fake tensors.

``Tracer`` builds the model under ``FakeTensorMode`` (shapes and dtypes only: nothing is
allocated), runs forward + loss + backward and an AdamW step on a synthetic batch under torch's
``MemTracker``, and records after every operator how many bytes are live as activations, temporaries
(gradients of activations and backward scratch) and parameter gradients. The planner combines that
curve with each strategy's model states (``model_states``), so the peak it predicts is the peak of
the sum over time, not the sum of separate peaks.

CUDA differs from this CPU trace in ways the trace cannot see; ``cuda=True`` accounts for them:
- the caching allocator rounds every block up to 512 bytes (applied to every tensor in the trace);
- AdamW defaults to the ``foreach`` implementation on CUDA, whose temporaries span all parameters
  (traced with ``foreach=True``);
- flash / memory-efficient attention keeps an fp32 workspace the size of the query in backward
  (``sdpa_workspace``: the largest query seen, in fp32);
- freed blocks are cached and split, so a request can fail while the total allocated is below the
  card (``largest_alloc``, rounded to the allocator's 2 MiB segments, is held in reserve).
bf16 is traced under CPU autocast with fp32 weights, as Accelerate runs DDP and FSDP; the autocast
weight copies appear as activations.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools import mem_tracker
from torch.distributed._tools.mem_tracker import MemTracker

CUDA_BLOCK = 512  # bytes: the caching allocator's smallest block
CUDA_SEGMENT = 2 * 1024**2  # bytes: the caching allocator's large-segment rounding

_ACT = (mem_tracker._MemRefType.ACT, mem_tracker._MemRefType.OTH)
_TEMP = mem_tracker._MemRefType.TEMP
_GRAD = mem_tracker._MemRefType.GRAD
_OPT = mem_tracker._MemRefType.OPT
_PARAM = mem_tracker._MemRefType.PARAM
_BUFFER = mem_tracker._MemRefType.BUFFER
_DEVICE = torch.ops.prim.device.default
_META = torch.device("meta")


@dataclass(frozen=True)
class Workload:
    """What one training step of a model is, without any engine: the planner traces this."""

    build_model: Callable[[], nn.Module]  # fp32 model on the current device/fake mode
    make_batch: Callable[[int, int], dict[str, Any]]  # (micro-batch, length in samples) -> batch
    loss: Callable[[nn.Module, dict[str, Any]], torch.Tensor]  # scalar loss of one batch
    param_groups: Callable[[nn.Module], list[dict]]  # AdamW groups
    apply_checkpointing: Callable[[nn.Module, str], int]  # (model, "none" | "blocks") -> blocks wrapped
    block_classes: tuple[type[nn.Module], ...]
    length_multiple: int = 1  # lengths the model accepts are multiples of this (SaShiMi's pooling)
    max_length: int | None = None  # longest input the model accepts (S4-DPLR's l_max), None = any


@dataclass(frozen=True)
class StepTrace:
    """Memory of one traced step, in bytes, for one (micro-batch, length, precision, checkpointing)."""

    batch_size: int
    length: int
    precision: str
    checkpointing: str
    params: int  # parameters as traced (fp32, one device)
    buffers: int  # module buffers (replicated under every strategy)
    grads: int  # parameter gradients at the end of backward
    optimizer: int  # optimizer states after the step
    optimizer_temp: int  # scratch of the optimizer step above its states
    activations: np.ndarray  # per operator during forward + backward (inputs included)
    temporary: np.ndarray  # per operator: activation gradients and backward scratch
    grad_fraction: np.ndarray  # per operator: share of the final parameter gradients already live
    largest_alloc: int  # biggest single tensor
    sdpa_workspace: int  # fp32 bytes of the largest attention query (CUDA attention backward scratch)
    seconds: float  # wall time of the trace

    def dynamic_peak(self, grads: float, grad_buffers: float) -> tuple[float, float, float]:
        """(activations, temporary, gradients) at the moment their sum peaks, when a strategy keeps
        ``grads`` bytes of gradients once backward is done and ``grad_buffers`` bytes during it."""
        in_backward = self.grad_fraction > 0
        grad_curve = self.grad_fraction * grads + in_backward * grad_buffers
        i = int(np.argmax(self.activations + self.temporary + grad_curve))
        return float(self.activations[i]), float(self.temporary[i]), float(grad_curve[i])


class _CurveTracker(MemTracker):
    """MemTracker that keeps a per-operator curve of the categories the planner needs.

    Its per-operator hook is a lean version of MemTracker's for one fake mode and plain tensors
    (no DTensor, no collectives): it classifies each output exactly as MemTracker does, but skips
    the per-module peak bookkeeping (the planner does not use it and it costs a pass over every
    module after every operator) and answers device queries without a second dispatch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.curve: list[tuple[int, int, int, int]] = []
        self.largest_alloc = 0
        self.sdpa_query_elems = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _DEVICE and isinstance(args[0], FakeTensor):  # asked constantly; allocates nothing
            fake = args[0]
            return _META if fake.fake_mode.in_kernel_invocation else fake.fake_device
        if func is torch.ops.aten.equal.default:
            # torch.istft checks its window overlap (NOLA) with a scalar ``equal`` that fake tensors
            # cannot answer; the check can only raise, so answer "not equal", i.e. it passes.
            return False
        if "scaled_dot_product" in func.__name__ and args:
            self.sdpa_query_elems = max(self.sdpa_query_elems, args[0].numel())
        out = func(*args, **(kwargs or {}))
        if self._in_opt:
            reftype = _OPT
        elif self._mod_tracker.is_bw and not self._in_ac:
            reftype = _TEMP
        else:
            reftype = mem_tracker._MemRefType.ACT
        for tensor in _tensors(out):
            self._track(reftype, tensor)
            self.largest_alloc = max(self.largest_alloc, tensor.untyped_storage().nbytes())
        snap = next(iter(self._curr_mem_snap.values()), None)
        if snap is not None:
            self.curve.append((snap[_ACT[0]] + snap[_ACT[1]], snap[_TEMP], snap[_GRAD], snap[_OPT]))
        return out


def _tensors(out: Any):
    """The tensors in an operator's output (a tensor, or nested tuples/lists of them)."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for item in out:
            yield from _tensors(item)


@contextlib.contextmanager
def _cuda_block_rounding(enabled: bool):
    """Round every tracked storage up to the CUDA allocator's 512-byte block while tracing on CPU."""
    if not enabled:
        yield
        return
    original = mem_tracker._WeakRefInfo._calculate_mem_consumed

    def rounded(info: mem_tracker._WeakRefInfo) -> int:
        return math.ceil(info.size * info.element_size / CUDA_BLOCK) * CUDA_BLOCK

    mem_tracker._WeakRefInfo._calculate_mem_consumed = rounded
    try:
        yield
    finally:
        mem_tracker._WeakRefInfo._calculate_mem_consumed = original


class Tracer:
    """Traces steps of one workload on fake tensors; the model is built once per checkpointing mode.

    ``step`` traces forward + loss + backward at one shape; ``optimizer`` traces one AdamW step once
    (its memory does not depend on the batch).
    """

    def __init__(self, workload: Workload, *, cuda: bool = True):
        self.workload, self.cuda = workload, cuda
        self.mode = FakeTensorMode()
        self._models: dict[str, nn.Module] = {}
        self._optimizer: tuple[int, int] | None = None

    def model(self, checkpointing: str) -> nn.Module:
        if checkpointing not in self._models:
            with self.mode:
                model = self.workload.build_model()
                model.train()
                self.workload.apply_checkpointing(model, checkpointing)
            self._models[checkpointing] = model
        return self._models[checkpointing]

    def optimizer(self) -> tuple[int, int]:
        """(optimizer state bytes, optimizer-step scratch bytes above them) of one AdamW step."""
        if self._optimizer is None:
            model = self.model("none")
            with self.mode, _cuda_block_rounding(self.cuda):
                for param in model.parameters():
                    param.grad = torch.zeros_like(param)
                optimizer = torch.optim.AdamW(self.workload.param_groups(model), lr=1e-4, foreach=self.cuda)
                tracker = _CurveTracker()
                tracker.track_external(model, optimizer)
                with tracker:
                    optimizer.step()
                    states = next(iter(tracker.get_tracker_snapshot("current").values()))[_OPT]
                model.zero_grad(set_to_none=True)
            self._optimizer = (int(states), int(max([row[3] for row in tracker.curve] or [0]) - states))
        return self._optimizer

    def step(self, batch_size: int, length: int, *, precision: str = "fp32",
             checkpointing: str = "none") -> StepTrace:
        """Trace forward + loss + backward of ``batch_size`` × ``length`` samples."""
        start = time.perf_counter()
        model = self.model(checkpointing)
        optimizer, optimizer_temp = self.optimizer()
        with self.mode, _cuda_block_rounding(self.cuda):
            batch = self.workload.make_batch(batch_size, length)
            tracker = _CurveTracker()
            tracker.track_external(model, *[v for v in batch.values() if isinstance(v, torch.Tensor)])
            autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                        else contextlib.nullcontext())
            with tracker:
                with autocast:
                    loss = self.workload.loss(model, batch)
                loss.backward()
                del loss
                final = next(iter(tracker.get_tracker_snapshot("current").values()))
            model.zero_grad(set_to_none=True)
        curve = np.asarray(tracker.curve or [(0, 0, 0, 0)], dtype=np.float64)
        grads = int(final[_GRAD])
        return StepTrace(
            batch_size=batch_size, length=length, precision=precision, checkpointing=checkpointing,
            params=int(final[_PARAM]), buffers=int(final[_BUFFER]), grads=grads,
            optimizer=optimizer, optimizer_temp=optimizer_temp,
            activations=curve[:, 0], temporary=curve[:, 1],
            grad_fraction=curve[:, 2] / grads if grads else np.zeros(len(curve)),
            largest_alloc=tracker.largest_alloc, sdpa_workspace=4 * tracker.sdpa_query_elems,
            seconds=time.perf_counter() - start,
        )
