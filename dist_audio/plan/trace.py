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
bf16 is traced the way each engine runs it (``bf16_as``): ``"autocast"`` (DDP: fp32 parameters, CPU
autocast; the autocast weight copies appear as activations), ``"parameters"`` (DeepSpeed: every parameter
and buffer cast to bf16, inputs as the loader made them) or ``"fsdp2"`` (FSDP2's ``MixedPrecisionPolicy``
as ``shard_with_fsdp2`` sets it: parameters bf16 except those of the model's ``fp32_classes``, each
block's and each fp32 module's floating inputs cast to its parameter dtype, the root's inputs left alone).
The model's float32 islands (``dist_audio.models.precision``) then upcast what they need, as in training.

``TracePool`` runs traces in forked worker processes, so independent shapes trace side by side, and
keeps them in an on-disk ``TraceCache`` when given one: a trace depends only on the step (the
workload's ``identity``), its key, the CUDA terms, torch and the source of the code that runs it.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import multiprocessing
import os
import pickle
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, in_kernel_invocation_manager
from torch.distributed._tools import mem_tracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._pytree import tree_map_only

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
BF16_AS = ("autocast", "parameters", "fsdp2")  # how bf16 reaches the model (see the module docstring)


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
    identity: str | None = None  # what the step computes, for the on-disk trace cache (None: not cached)


@dataclass(frozen=True)
class StepTrace:
    """Memory of one traced step, in bytes, for one (micro-batch, length, precision, checkpointing).

    Picklable (plain numbers and arrays): worker processes send it back."""

    batch_size: int
    length: int
    precision: str  # fp32 | bf16
    checkpointing: str
    bf16_as: str | None  # None in fp32, else one of BF16_AS
    params: int  # parameters as traced (their dtype as the engine stores them, one device)
    buffers: int  # module buffers (replicated under every strategy)
    grads: int  # parameter gradients at the end of backward
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


@dataclass(frozen=True)
class OptimizerTrace:
    """Memory of one AdamW step, in bytes: it depends on the parameters, not on the batch, so it is
    traced once per workload."""

    states: int  # optimizer states after the step
    temporary: int  # scratch of the step above its states
    seconds: float  # wall time of the trace


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
        self._seen_modules: set[int] = set()

    # Module hooks: only what classifies tensors (parameters and their gradient hooks on first sight,
    # the activation-checkpointing recompute flag), none of MemTracker's per-module snapshots.
    def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
        if id(module) not in self._seen_modules:
            self._seen_modules.add(id(module))
            self._track_module_params_and_buffers(module, install_grad_hooks=True)
        elif self._mod_tracker.is_bw and self._ac_mod is None:  # recomputing a checkpointed block
            self._ac_mod = weakref.ref(module)
            self._in_ac = True

    def _post_fw_hook(self, module: nn.Module, inputs: Any, outputs: Any) -> None:
        if self._mod_tracker.is_bw and self._ac_mod is not None and self._ac_mod() is module:
            self._ac_mod = None
            self._in_ac = False

    def _pre_bw_hook(self, module: nn.Module, args: Any) -> None:
        pass

    def _post_bw_hook(self, module: nn.Module, args: Any) -> None:
        pass

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
        out = _run_operator(func, args, kwargs)
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


_UNSAFE_VIEW = torch.ops.aten._unsafe_view.default  # a view the schema does not declare as one


def _run_operator(func: Any, args: tuple, kwargs: dict | None) -> Any:
    """Run one operator on fake tensors; views (which allocate nothing) through ATen's C++ meta kernel.

    FakeTensorMode answers every operator through its dispatch cache, and views it computes in Python
    (``torch._refs._reshape_view_helper``, decompositions: several nested dispatches per call) to
    support symbolic shapes. A ``Tracer``'s mode has no ShapeEnv, so every shape is concrete and the
    meta kernel returns the same sizes, strides and storage: views are 40-60 % of a step's operators,
    and this halves a TF-SWA trace at a shape new to its process. Constant fake tensors (which carry
    real data) keep the fake mode's path.
    """
    if ((func.is_view or func is _UNSAFE_VIEW) and not kwargs and isinstance(args[0], FakeTensor)
            and args[0].constant is None):
        fake_mode, device = args[0].fake_mode, args[0].fake_device
        with in_kernel_invocation_manager(fake_mode):
            out = func(*args)
        wrap = fake_mode.fake_tensor_converter.from_meta_and_device
        if isinstance(out, torch.Tensor):
            return wrap(fake_mode, out, device)
        return type(out)(wrap(fake_mode, view, device) for view in out)  # unbind, split, ...: several views
    return func(*args, **(kwargs or {}))


def _cast_floating(dtype: torch.dtype) -> Callable[..., Any]:
    """A forward pre-hook casting a module's floating inputs to ``dtype``, as FSDP2's ``cast_forward_inputs``."""

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tree_map_only(torch.Tensor, cast, (args, kwargs))

    return hook


def _to_bf16(model: nn.Module, *, keep: set[int], buffers: bool) -> None:
    """Replace each floating parameter of ``model`` not in ``keep`` (ids) by a bf16 one, and with
    ``buffers`` each floating buffer (in place of ``Module.bfloat16``, which cannot swap fake tensors)."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in keep and param.is_floating_point():
                module._parameters[name] = nn.Parameter(param.detach().to(torch.bfloat16),
                                                        requires_grad=param.requires_grad)
        for name, buffer in module.named_buffers(recurse=False):
            if buffers and buffer.is_floating_point():
                module._buffers[name] = buffer.to(torch.bfloat16)


def _as_engine_stores(model: nn.Module, bf16_as: str | None) -> None:
    """Give ``model`` the parameter dtypes (and input casts) its engine runs it with under bf16."""
    from dist_audio.train.parallelize import block_modules, fp32_modules

    if bf16_as == "parameters":  # DeepSpeed: module.bfloat16() on the whole model
        _to_bf16(model, keep=set(), buffers=True)
    elif bf16_as == "fsdp2":  # shard_with_fsdp2: fp32 units, bf16 blocks, bf16 root without input cast
        _to_bf16(model, keep={id(p) for module in fp32_modules(model) for p in module.parameters()}, buffers=False)
        for module in fp32_modules(model):
            module.register_forward_pre_hook(_cast_floating(torch.float32), with_kwargs=True)
        for block in block_modules(model):
            block.register_forward_pre_hook(_cast_floating(torch.bfloat16), with_kwargs=True)


class Tracer:
    """Traces steps of one workload on fake tensors; the model is built once per checkpointing mode and
    parameter layout.

    ``step`` traces forward + loss + backward at one shape; ``optimizer`` traces one AdamW step once
    (its memory does not depend on the batch).
    """

    def __init__(self, workload: Workload, *, cuda: bool = True):
        self.workload, self.cuda = workload, cuda
        self.mode = FakeTensorMode()
        self._models: dict[tuple[str, str | None], nn.Module] = {}
        self._optimizer: OptimizerTrace | None = None

    def model(self, checkpointing: str, bf16_as: str | None = None) -> nn.Module:
        """The fake model with ``checkpointing`` applied, its parameters stored as ``bf16_as`` says
        (autocast and fp32 share the fp32 model)."""
        stored = bf16_as if bf16_as in ("parameters", "fsdp2") else None
        key = (checkpointing, stored)
        if key not in self._models:
            with self.mode:
                model = self.workload.build_model()
                model.train()
                self.workload.apply_checkpointing(model, checkpointing)
                _as_engine_stores(model, stored)
            self._models[key] = model
        return self._models[key]

    def optimizer(self) -> OptimizerTrace:
        """One AdamW step over the fp32 model's gradients (traced once, then remembered)."""
        if self._optimizer is None:
            start = time.perf_counter()
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
            self._optimizer = OptimizerTrace(int(states), int(max([row[3] for row in tracker.curve] or [0]) - states),
                                             time.perf_counter() - start)
        return self._optimizer

    def step(self, batch_size: int, length: int, *, precision: str = "fp32",
             checkpointing: str = "none", bf16_as: str = "autocast") -> StepTrace:
        """Trace forward + loss + backward of ``batch_size`` × ``length`` samples; under bf16 the model
        meets it as ``bf16_as`` says (``BF16_AS``)."""
        if precision == "bf16" and bf16_as not in BF16_AS:
            raise ValueError(f"bf16_as must be one of {BF16_AS}, got {bf16_as!r}")
        cast = bf16_as if precision == "bf16" else None
        start = time.perf_counter()
        model = self.model(checkpointing, cast)
        with self.mode, _cuda_block_rounding(self.cuda):
            batch = self.workload.make_batch(batch_size, length)
            tracker = _CurveTracker()
            tracker.track_external(model, *[v for v in batch.values() if isinstance(v, torch.Tensor)])
            autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if cast == "autocast"
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
            bf16_as=cast, params=int(final[_PARAM]), buffers=int(final[_BUFFER]), grads=grads,
            activations=curve[:, 0], temporary=curve[:, 1],
            grad_fraction=curve[:, 2] / grads if grads else np.zeros(len(curve)),
            largest_alloc=tracker.largest_alloc, sdpa_workspace=4 * tracker.sdpa_query_elems,
            seconds=time.perf_counter() - start,
        )


TraceKey = tuple  # (micro-batch, length, precision, checkpointing, bf16_as) of a step, or OPTIMIZER
OPTIMIZER: TraceKey = ("optimizer",)  # the AdamW step, traced once per workload

_POOL_TRACER: Tracer | None = None  # the tracer forked workers inherit


def _trace(tracer: Tracer, key: TraceKey) -> StepTrace | OptimizerTrace:
    if key == OPTIMIZER:
        return tracer.optimizer()
    batch_size, length, precision, checkpointing, bf16_as = key
    return tracer.step(batch_size, length, precision=precision, checkpointing=checkpointing,
                       bf16_as=bf16_as or "autocast")


def _trace_in_worker(keys: list[TraceKey]) -> list[StepTrace | OptimizerTrace]:
    assert _POOL_TRACER is not None, "workers are forked after the pool sets its tracer"
    return [_trace(_POOL_TRACER, key) for key in keys]


def _same_shapes(key: TraceKey) -> tuple:
    """Keys alike here trace the same operators on the same shapes and dtypes (only checkpointing
    differs), so one process traces them in a row: the second reuses the fake-tensor cache entries
    of the first, which at a new shape cost about as much as the rest of the trace."""
    if key == OPTIMIZER:
        return key
    batch_size, length, precision, _, bf16_as = key
    return batch_size, length, precision, bf16_as


def _item(task: Future, index: int) -> Future:
    """A future for item ``index`` of ``task``'s list result."""
    item: Future = Future()

    def done(finished: Future) -> None:
        if finished.exception() is not None:
            item.set_exception(finished.exception())
        else:
            item.set_result(finished.result()[index])

    task.add_done_callback(done)
    return item


def _autograd_works() -> bool:
    """Whether autograd runs in this process (it does not in a child forked after the parent ran a
    backward pass: torch refuses autograd's threads across fork)."""
    x = torch.ones(1, requires_grad=True)
    try:
        (2 * x).sum().backward()
    except RuntimeError:
        return False
    return True


def default_workers() -> int:
    """Worker processes for tracing: the cores this process may use (1 = trace in-process)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# the code a trace runs, relative to the package root: a change to any of it invalidates cached traces
_TRACED_SOURCES = ("models", "objectives", "plan/trace.py", "plan/planner.py", "train/parallelize.py", "config.py")


def _source_digest() -> str:
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(torch.__version__.encode())
    for entry in _TRACED_SOURCES:
        for path in sorted((root / entry).rglob("*.py")) if (root / entry).is_dir() else [root / entry]:
            digest.update(path.read_bytes())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$DIST_AUDIO_PLAN_CACHE``, else ``$XDG_CACHE_HOME/dist_audio/plan`` (``~/.cache/dist_audio/plan``)."""
    if os.environ.get("DIST_AUDIO_PLAN_CACHE"):
        return Path(os.environ["DIST_AUDIO_PLAN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dist_audio" / "plan"


class TraceCache:
    """Traces on disk, one pickle per (workload identity, key, CUDA terms, torch + traced source)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._digest = _source_digest()

    def _path(self, identity: str, key: TraceKey, cuda: bool) -> Path:
        name = hashlib.sha256(repr((self._digest, identity, key, cuda)).encode()).hexdigest()
        return self.directory / f"{name}.pkl"

    def load(self, identity: str, key: TraceKey, cuda: bool) -> StepTrace | OptimizerTrace | None:
        try:
            trace = pickle.loads(self._path(identity, key, cuda).read_bytes())
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError):
            return None
        return trace if isinstance(trace, OptimizerTrace if key == OPTIMIZER else StepTrace) else None

    def save(self, identity: str, key: TraceKey, cuda: bool, trace: StepTrace | OptimizerTrace) -> None:
        path = self._path(identity, key, cuda)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_bytes(pickle.dumps(trace))
            os.replace(partial, path)
        except OSError:  # a read-only or full cache only costs the next run its time
            pass


class TracePool:
    """Traces keyed steps (and the ``OPTIMIZER`` step) of one ``Tracer``, memoised, in ``workers`` forked
    processes (in-process with 1).

    The workers are forked at the first ``prefetch``, right after the imports, with the inherited heap
    frozen, so that their garbage collectors skip it instead of copying its pages to mark them; each
    builds the models it traces. Each trace is independent of the others, so results do not depend on
    which worker ran it. Where a forked child cannot run autograd (this process already ran a backward
    pass, e.g. inside a test session), tracing stays in this process.
    """

    def __init__(self, tracer: Tracer, workers: int = 1, cache: TraceCache | None = None):
        self.tracer, self.workers = tracer, workers
        identity = tracer.workload.identity
        self.cache = cache if identity is not None else None
        self._futures: dict[TraceKey, Future] = {}
        self._executor: ProcessPoolExecutor | None = None
        self._stored: set[TraceKey] = set()  # in the cache already
        self.from_cache = 0  # traces read from the cache rather than traced

    def _cached(self, key: TraceKey) -> bool:
        """Whether ``key`` is now known from the cache (then its result is ready)."""
        if self.cache is None:
            return False
        trace = self.cache.load(self.tracer.workload.identity, key, self.tracer.cuda)  # type: ignore[arg-type]
        if trace is None:
            return False
        future: Future = Future()
        future.set_result(trace)
        self._futures[key] = future
        self._stored.add(key)
        self.from_cache += key != OPTIMIZER
        return True

    def prefetch(self, keys: Iterable[TraceKey]) -> None:
        """Start tracing ``keys`` not traced or tracing yet (in-process: traced when asked for)."""
        global _POOL_TRACER
        keys = [key for key in dict.fromkeys(keys) if key not in self._futures and not self._cached(key)]
        if self.workers <= 1 or not keys:
            return
        if self._executor is None:
            _POOL_TRACER = self.tracer
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"))
            gc.freeze()  # the workers are forked at the first submit; their collectors then skip this heap
            autograd_works = self._executor.submit(_autograd_works)
            gc.unfreeze()
            if not autograd_works.result():
                self.close()
                self.workers = 1
                return
        groups: dict[tuple, list[TraceKey]] = {}
        for key in keys:
            groups.setdefault(_same_shapes(key), []).append(key)
        for group in groups.values():
            task = self._executor.submit(_trace_in_worker, group)
            for i, key in enumerate(group):
                self._futures[key] = _item(task, i)

    def step(self, key: TraceKey) -> StepTrace:
        """The traced step of ``key`` (waits for it, or traces it here)."""
        return self._get(key)  # type: ignore[return-value]

    def optimizer(self) -> OptimizerTrace:
        """The traced AdamW step (waits for it, or traces it here)."""
        return self._get(OPTIMIZER)  # type: ignore[return-value]

    def _get(self, key: TraceKey) -> StepTrace | OptimizerTrace:
        if key not in self._futures:
            self.prefetch([key])
        if key not in self._futures:  # in-process
            future: Future = Future()
            future.set_result(_trace(self.tracer, key))
            self._futures[key] = future
        trace = self._futures[key].result()
        if self.cache is not None and key not in self._stored:
            self._stored.add(key)
            self.cache.save(self.tracer.workload.identity, key, self.tracer.cuda, trace)  # type: ignore[arg-type]
        return trace

    def __len__(self) -> int:
        """Steps traced or read from the cache."""
        return sum(key != OPTIMIZER for key in self._futures)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)
            self._executor = None

