"""The memory plan: every strategy × checkpointing × precision, what fits, what to launch.

Tracing is the expensive part, so the step is traced once per (checkpointing, precision as the
engine runs it) at the configured micro-batch and segment, and every strategy's model states are added
analytically (``model_states``). The largest micro-batch and segment are found by tracing one more size
along each axis, fitting the predicted peak as linear in it, and tracing the answer to check the fit.
Every trace that does not wait on another runs at the same time, in forked workers (``TracePool``):
the table's traces together, then both axes' second sizes, then both answers.

The recommendation keeps the run's ``train.mixed_precision``: the rows of the other precision are shown,
never recommended.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dist_audio.config import ConfigError, RunConfig, SashimiConfig, TFSWAConfig
from dist_audio.plan.model_states import (
    BF16_AS,
    OFFLOAD_STRATEGIES,
    PRECISIONS,
    STRATEGIES,
    ParamLayout,
    model_states,
    param_layout,
)
from dist_audio.plan.trace import (
    CUDA_SEGMENT,
    OPTIMIZER,
    OptimizerTrace,
    StepTrace,
    TraceCache,
    TraceKey,
    TracePool,
    Tracer,
    Workload,
    default_workers,
)

GIB = 1024**3
CHECKPOINTING = ("none", "blocks")
# CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers live outside PyTorch's allocator but on the card.
CUDA_RUNTIME_RESERVE = 0.5 * GIB
DEFAULT_SAMPLE_RATE = 16_000  # SaShiMi configs carry no rate; the shards' manifest gives it when present
MAX_MICRO_BATCH = 4096  # search caps
MAX_SEGMENT_SECONDS = 600.0

CUDA_NOTES = (
    "traced on fake CPU tensors; CUDA differences added explicitly: every tensor rounded up to the "
    "allocator's 512 B blocks, the largest tensor rounded to 2 MiB held as allocator slack, an fp32 "
    "attention workspace of the largest query (flash/mem-efficient backward), foreach AdamW "
    "temporaries, and 0.5 GiB for the CUDA context, library workspaces and NCCL buffers",
    "bf16 traced as each engine runs it: DDP under autocast (fp32 weights, bf16 matmuls/convs); "
    "DeepSpeed with every parameter bf16 (fp32 master weights and gradients in the optimizer); FSDP2 "
    "with bf16 units and the model's fp32_classes kept fp32 (MixedPrecisionPolicy as the trainer sets it)",
)


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------


def parse_memory(text: str) -> int:
    """Bytes in ``"24GiB"``, ``"80GB"``, ``"512MiB"`` or a bare number of GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?)?\s*", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"expected a size such as 24GiB or 80GB, got {text!r}")
    value, unit = float(match.group(1)), (match.group(2) or "GiB").upper()
    power = "KMGT".index(unit[0]) + 1
    base = 1000 if unit.endswith("B") and "I" not in unit else 1024
    return int(value * base**power)


def samples_per_second(cfg: RunConfig, sample_rate: int | None = None) -> float:
    """Time steps per second of audio the model sees (SaShiMi's interleaved stereo doubles them)."""
    rate = sample_rate or getattr(cfg.model, "sample_rate", None) or _manifest_rate(cfg) or DEFAULT_SAMPLE_RATE
    if isinstance(cfg.model, SashimiConfig) and cfg.data.interleave_stereo:
        return 2.0 * rate
    return float(rate)


def _manifest_rate(cfg: RunConfig) -> int | None:
    path = Path(cfg.data.shards) / "manifest.json"
    try:
        return int(json.loads(path.read_text())["sample_rate"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def config_workload(cfg: RunConfig) -> Workload:
    """The real training step of ``cfg``: its model, objective, AdamW groups and checkpointing."""
    from dist_audio.models import build_model
    from dist_audio.objectives import build_objective
    from dist_audio.train.parallelize import apply_activation_checkpointing

    objective = build_objective(cfg.model, cfg.data)
    with torch.device("meta"):
        block_classes = tuple(type(build_model(cfg.model)).block_classes)

    def make_batch(batch_size: int, length: int) -> dict[str, Any]:
        keys = [f"synthetic-{i}" for i in range(batch_size)]
        if isinstance(cfg.model, TFSWAConfig):
            shape = (batch_size, len(cfg.model.sources), cfg.model.channels, length)
            stems = torch.randn(shape) * 0.1
            return {"mixture": stems.sum(1), "stems": stems, "keys": keys, "skipped": torch.zeros((), dtype=torch.long)}
        y = torch.randint(0, 2**cfg.model.bits, (batch_size, length))
        x = torch.cat([torch.zeros(batch_size, 1, dtype=torch.long), y[:, :-1]], dim=1)
        return {"x": x, "y": y, "keys": keys, "skipped": torch.zeros((), dtype=torch.long)}

    identity = json.dumps({"model": dataclasses.asdict(cfg.model), "data": dataclasses.asdict(cfg.data),
                           "weight_decay": cfg.optim.weight_decay}, sort_keys=True, default=str)
    return Workload(
        identity=identity,
        build_model=lambda: build_model(cfg.model),
        make_batch=make_batch,
        loss=lambda model, batch: objective.loss(model, batch)[0],
        param_groups=lambda model: model.param_groups(cfg.optim.weight_decay),
        apply_checkpointing=apply_activation_checkpointing,
        block_classes=block_classes,
        length_multiple=math.prod(cfg.model.pool) if isinstance(cfg.model, SashimiConfig) else 1,
        max_length=cfg.model.s4.l_max if isinstance(cfg.model, SashimiConfig) and cfg.model.s4.mode == "dplr" else None,
    )


# --------------------------------------------------------------------------------------------------
# prediction
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """Predicted peak bytes per GPU of one strategy × checkpointing × precision, split by kind."""

    strategy: str
    activation_checkpointing: str
    precision: str
    params: float
    grads: float
    optimizer: float
    activations: float
    temporary: float
    host: float  # per node
    fits: bool

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.temporary

    def as_dict(self) -> dict[str, Any]:
        per_gpu = {k: round(getattr(self, k) / GIB, 3)
                   for k in ("params", "grads", "optimizer", "activations", "temporary")}
        per_gpu["total"] = round(self.total / GIB, 3)
        return {"strategy": self.strategy, "activation_checkpointing": self.activation_checkpointing,
                "precision": self.precision, "per_gpu_gib": per_gpu, "host_gib": round(self.host / GIB, 3),
                "fits": self.fits}


def predict(trace: StepTrace, optimizer: OptimizerTrace, strategy: str, layout: ParamLayout, world_size: int,
            gpus_per_node: int, *, cuda: bool = True, budget: float = math.inf) -> Row:
    """Peak per GPU of ``strategy`` at the trace's shape: model states plus the traced curve, at the
    moment their sum is largest (during forward/backward, or in the optimizer step)."""
    states = model_states(strategy, trace.precision, layout, world_size)
    activations, temporary, grads = trace.dynamic_peak(states.grads, states.grad_buffers)
    opt_temp = optimizer.temporary * states.optimizer / optimizer.states if optimizer.states else 0.0
    if states.grads + states.grad_buffers + opt_temp > activations + temporary + grads:
        activations, temporary, grads = 0.0, opt_temp, states.grads + states.grad_buffers
    if cuda:
        temporary += trace.sdpa_workspace + CUDA_SEGMENT * math.ceil(trace.largest_alloc / CUDA_SEGMENT)
        temporary += CUDA_RUNTIME_RESERVE
    row = Row(strategy, trace.checkpointing, trace.precision, params=states.params + trace.buffers,
              grads=grads, optimizer=states.optimizer, activations=activations, temporary=temporary,
              host=states.host * gpus_per_node, fits=False)
    return dataclasses.replace(row, fits=row.total <= budget)


_SPEED_RANK = {s: i for i, s in enumerate(("ddp", "zero2", "zero3", "fsdp", "zero3_offload", "fsdp_offload"))}


def speed_order(row: Row) -> tuple:
    """Sort key, fastest first: DDP, ZeRO-2, ZeRO-3/FSDP, offload; no recomputation before blocks."""
    return (_SPEED_RANK[row.strategy], CHECKPOINTING.index(row.activation_checkpointing))


def row_precision(mixed_precision: str) -> str:
    """The rows' precision for a ``train.mixed_precision`` (fp16 stores and computes in as many bytes as bf16)."""
    return "fp32" if mixed_precision in ("no", "fp32") else "bf16"


# --------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------


@dataclass
class Fit:
    """A largest size along one axis, from a linear fit of two traces, checked by a third."""

    value: float  # micro-batch, or segment seconds
    fit_error: float  # |fit − trace| / trace of the predicted peak at the answer
    capped: bool = False  # the search hit its cap: the true maximum is larger


@dataclass
class Plan:
    rows: list[Row]
    recommended: Row | None
    searched_row: Row  # the row the max micro-batch / segment are for
    max_micro_batch: Fit
    max_segment: Fit
    accelerate_config: str
    launch: str
    inputs: dict[str, Any]
    seconds: float  # whole plan
    table_seconds: float  # the 24 rows (8 traced steps), before the micro-batch / segment search
    traces: int  # distinct steps the plan used
    traces_from_cache: int = 0  # of which read from the on-disk cache
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "rows": [r.as_dict() for r in self.rows],
            "recommended": self.recommended.as_dict() if self.recommended else None,
            "max_micro_batch": int(self.max_micro_batch.value),
            "max_segment_seconds": self.max_segment.value,
            "accelerate_config": self.accelerate_config,
            "launch": self.launch,
            "search": {"row": self.searched_row.as_dict(),
                       "micro_batch_fit_error": round(self.max_micro_batch.fit_error, 4),
                       "segment_fit_error": round(self.max_segment.fit_error, 4),
                       "micro_batch_capped": self.max_micro_batch.capped,
                       "segment_capped": self.max_segment.capped},
            "notes": self.notes,
            "planner_seconds": round(self.seconds, 2),
            "table_seconds": round(self.table_seconds, 2),
            "traces": self.traces,
            "traces_from_cache": self.traces_from_cache,
        }


class Planner:
    """Traces a workload on demand (memoised by shape, in parallel workers) and predicts rows for one
    cluster shape."""

    def __init__(self, workload: Workload, layout: ParamLayout, *, gpus: int, nodes: int = 1,
                 gpu_memory: int, margin: float = 0.1, cuda: bool = True, workers: int | None = None,
                 cache: TraceCache | None = None):
        self.workload, self.layout, self.cuda = workload, layout, cuda
        self.gpus, self.nodes, self.world = gpus, nodes, gpus * nodes
        self.budget = gpu_memory * (1.0 - margin)
        self.tracer = Tracer(workload, cuda=cuda)
        self.pool = TracePool(self.tracer, default_workers() if workers is None else workers, cache)

    @staticmethod
    def key(strategy: str, batch_size: int, length: int, precision: str, checkpointing: str) -> TraceKey:
        """The trace a row needs: under bf16 each engine runs the model its own way (``BF16_AS``)."""
        return (batch_size, length, precision, checkpointing, BF16_AS[strategy] if precision == "bf16" else None)

    def trace(self, batch_size: int, length: int, precision: str, checkpointing: str,
              bf16_as: str = "autocast") -> StepTrace:
        return self.pool.step((batch_size, length, precision, checkpointing, bf16_as if precision == "bf16" else None))

    @property
    def traces(self) -> int:
        return len(self.pool)

    def row(self, strategy: str, batch_size: int, length: int, precision: str, checkpointing: str) -> Row:
        trace = self.pool.step(self.key(strategy, batch_size, length, precision, checkpointing))
        return predict(trace, self.pool.optimizer(), strategy, self.layout, self.world, self.gpus, cuda=self.cuda,
                       budget=self.budget)

    def rows(self, batch_size: int, length: int) -> list[Row]:
        variants = [(s, ac, p) for s in STRATEGIES for ac in CHECKPOINTING for p in PRECISIONS]
        self.pool.prefetch([OPTIMIZER, *(self.key(s, batch_size, length, p, ac) for s, ac, p in variants)])
        return [self.row(s, batch_size, length, p, ac) for s, ac, p in variants]

    def largest(self, row: Row, batch_size: int, length: int, axis: str, cap: int) -> tuple[int, float, bool]:
        """Largest micro-batch (``axis="batch"``) or length that fits under ``row``'s choices:
        (value, fit error, capped). Linear fit through two traced sizes, then checked by tracing."""
        return self.largest_along([(row, batch_size, length, axis, cap)])[0]

    def largest_along(self, searches: list[tuple[Row, int, int, str, int]]) -> list[tuple[int, float, bool]]:
        """Several ``largest`` searches in lockstep, so the traces each round needs run side by side."""
        running = [self._search(*search) for search in searches]
        results: list[tuple[int, float, bool] | None] = [None] * len(running)
        wanted = [next(search) for search in running]
        while any(r is None for r in results):
            self.pool.prefetch(key for keys, r in zip(wanted, results) if r is None for key in keys)
            for i, search in enumerate(running):
                if results[i] is None:
                    try:
                        wanted[i] = search.send(None)
                    except StopIteration as done:
                        results[i] = done.value
        return results  # type: ignore[return-value]

    def _search(self, row: Row, batch_size: int, length: int, axis: str,
                cap: int) -> Generator[list[TraceKey], None, tuple[int, float, bool]]:
        """One ``largest`` search; yields the trace keys it is about to need before it needs them."""

        def key(size: int) -> TraceKey:
            b, n = (size, length) if axis == "batch" else (batch_size, size)
            return self.key(row.strategy, b, n, row.precision, row.activation_checkpointing)

        def total(size: int) -> float:
            b, n = (size, length) if axis == "batch" else (batch_size, size)
            return self.row(row.strategy, b, n, row.precision, row.activation_checkpointing).total

        start = batch_size if axis == "batch" else length
        step = 1 if axis == "batch" else self.workload.length_multiple
        lo, hi = start, 2 * start
        if hi > cap:  # the configured size is near the cap (S4-DPLR's l_max): fit below it instead
            lo, hi = max(step, start // 2 // step * step), start
        yield [key(lo), key(hi)]
        slope = (total(hi) - total(lo)) / (hi - lo)
        if slope <= 0:
            return cap, 0.0, True
        best = int((self.budget - total(lo)) / slope) + lo
        capped = best >= cap
        best = min(best, cap) // step * step
        if best < 1:
            return 0, 0.0, False
        fitted = total(lo) + slope * (best - lo)
        yield [key(best)]
        traced = total(best)
        error = abs(fitted - traced) / traced
        for _ in range(3):  # the fit was optimistic: secant steps down along the trace
            if traced <= self.budget or best <= step:
                break
            slope = max(slope, (traced - total(lo)) / max(best - lo, 1))
            best = max(step, int(best - (traced - self.budget) / slope) - step) // step * step
            yield [key(best)]
            traced, capped = total(best), False
        return (best if traced <= self.budget else 0), error, capped

    def close(self) -> None:
        """Stop the tracing workers."""
        self.pool.close()


def make_plan(cfg: RunConfig, *, gpus: int, gpu_memory: int, nodes: int = 1, margin: float = 0.1,
              sample_rate: int | None = None, workload: Workload | None = None, cuda: bool = True,
              config_path: str = "CONFIG", workers: int | None = None,
              cache_dir: str | Path | None = None) -> Plan:
    """Plan ``cfg`` on ``nodes`` × ``gpus`` GPUs of ``gpu_memory`` bytes each; ``workers`` tracing
    processes (default: one per usable core; 1 traces in this process); traces kept in ``cache_dir``
    (default: none kept)."""
    start = time.perf_counter()
    workload = workload or config_workload(cfg)
    with torch.device("meta"):
        layout = param_layout(workload.build_model())
    rate = samples_per_second(cfg, sample_rate)
    multiple = workload.length_multiple
    batch = cfg.data.batch_size
    length = max(2, multiple * math.ceil(round(cfg.data.segment_seconds * rate) / multiple))
    planner = Planner(workload, layout, gpus=gpus, nodes=nodes, gpu_memory=gpu_memory, margin=margin, cuda=cuda,
                      workers=workers, cache=TraceCache(cache_dir) if cache_dir is not None else None)
    try:
        rows = planner.rows(batch, length)
        table_seconds = time.perf_counter() - start
        precision = row_precision(cfg.train.mixed_precision)
        own = [r for r in rows if r.precision == precision]  # the run's precision is never changed
        fitting = sorted((r for r in own if r.fits), key=speed_order)
        recommended = fitting[0] if fitting else None
        searched = recommended or min(own, key=lambda r: r.total)
        length_cap = min(int(MAX_SEGMENT_SECONDS * rate), workload.max_length or math.inf)
        (max_batch, batch_error, batch_capped), (max_length, length_error, length_capped) = planner.largest_along(
            [(searched, batch, length, "batch", MAX_MICRO_BATCH), (searched, batch, length, "length", length_cap)])
        traces, from_cache = planner.traces, planner.pool.from_cache
    finally:
        planner.close()
    world = gpus * nodes
    config_file = ("single" if world == 1 and searched.strategy == "ddp" else searched.strategy)
    accelerate_config = f"configs/accelerate/{config_file}.yaml"
    notes = list(CUDA_NOTES) if cuda else ["CPU prediction: no CUDA allocator or runtime terms"]
    if sample_rate is None and not getattr(cfg.model, "sample_rate", None) and not _manifest_rate(cfg):
        notes.append(f"sample rate assumed {DEFAULT_SAMPLE_RATE} Hz (no manifest at data.shards; "
                     "pass --sample-rate)")
    if nodes > 1:
        notes.append("multi-node: launch the same file with --num_machines/--machine_rank "
                     "(configs/accelerate/two_node_zero3.yaml is an example)")
    if recommended is None:
        notes.append(f"nothing fits at micro-batch {batch} × {cfg.data.segment_seconds} s; the limits "
                     f"below are for the smallest row ({searched.strategy}, {searched.activation_checkpointing}, "
                     f"{searched.precision})")
    other = next((r for r in sorted((r for r in rows if r.fits and r.precision != precision), key=speed_order)), None)
    if recommended is None and other is not None:
        notes.append(f"{other.precision} rows fit ({other.strategy}, checkpointing {other.activation_checkpointing}: "
                     f"{other.total / GIB:.2f} GiB); the plan keeps train.mixed_precision="
                     f"{cfg.train.mixed_precision} as configured")
    overrides = [f"--set train.activation_checkpointing={searched.activation_checkpointing}",
                 f"--set train.mixed_precision={cfg.train.mixed_precision}"]
    if recommended is None and max_batch >= 1:
        overrides.append(f"--set data.batch_size={max_batch}")
    launch = (f"accelerate launch --config_file {accelerate_config} --num_processes {world}"
              + (f" --num_machines {nodes}" if nodes > 1 else "")
              + f" launch/train.py --config {config_path} " + " ".join(overrides))
    return Plan(
        rows=rows, recommended=recommended, searched_row=searched,
        max_micro_batch=Fit(max_batch, batch_error, batch_capped),
        max_segment=Fit(math.floor(100 * max_length / rate) / 100, length_error, length_capped),
        accelerate_config=accelerate_config, launch=launch,
        inputs={"config": config_path, "model": cfg.model.name, "gpus": gpus, "nodes": nodes,
                "gpu_memory_gib": round(gpu_memory / GIB, 3), "margin": margin,
                "budget_gib": round(planner.budget / GIB, 3), "micro_batch": batch,
                "segment_seconds": cfg.data.segment_seconds, "samples_per_second": rate,
                "length": length, "parameters": layout.total, "largest_block_parameters": layout.largest_unit,
                "blocks": layout.units, "offload_host_gib_is": "per node",
                "offload_strategies": list(OFFLOAD_STRATEGIES)},
        seconds=time.perf_counter() - start, table_seconds=table_seconds, traces=traces,
        traces_from_cache=from_cache, notes=notes,
    )


def check_inputs(gpus: int, nodes: int, margin: float) -> None:
    """Reject impossible cluster shapes as config errors naming the option."""
    if gpus < 1:
        raise ConfigError("--gpus", "must be >= 1")
    if nodes < 1:
        raise ConfigError("--nodes", "must be >= 1")
    if not 0.0 <= margin < 1.0:
        raise ConfigError("--margin", "must be in [0, 1)")
