"""The work ``bench/gpu_check.py`` runs in its child processes, one JSON result file per call.

    accelerate launch --config_file configs/accelerate/<strategy>.yaml --num_processes 1 \\
        bench/gpu_workers.py steps JOB.json          # training steps per row (memory, throughput)
    python bench/gpu_workers.py plan JOB.json        # the planner's rows for each config
    python bench/gpu_workers.py generate JOB.json    # recurrent generation, eager and CUDA-graphed
    python bench/gpu_workers.py auto_fit JOB.json    # Trainer with train.auto_fit under a memory cap

Each reads its job (a JSON object; ``job["out"]`` is where the result goes) and writes the result as
JSON. Kept apart from the orchestrator so each check runs in its own process: a CUDA error, a hang or
a crash in one ends only that process.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dist_audio.config import load_config  # noqa: E402
from dist_audio.process_exit import exit_without_teardown  # noqa: E402

GIB = 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# planner rows
# --------------------------------------------------------------------------------------------------


def plan(job: dict[str, Any]) -> dict[str, Any]:
    """The planner's rows for each config on one GPU of ``job["gpu_memory"]`` bytes, at the config's own
    micro-batch and segment (``Planner.rows``: the table of ``launch/plan.py``, without its search for the
    largest batch and segment, which the check does not need)."""
    from dist_audio.plan import Planner, config_workload, param_layout
    from dist_audio.plan.planner import samples_per_second

    plans = {}
    for config in job["configs"]:
        cfg = load_config(config, job["overrides"])
        start = time.perf_counter()
        workload = config_workload(cfg)
        with torch.device("meta"):
            layout = param_layout(workload.build_model())
        multiple = workload.length_multiple
        length = max(2, multiple * math.ceil(round(cfg.data.segment_seconds * samples_per_second(cfg)) / multiple))
        planner = Planner(workload, layout, gpus=1, gpu_memory=job["gpu_memory"])
        rows = [row.as_dict() for row in planner.rows(cfg.data.batch_size, length)]
        plans[config] = {"rows": rows, "micro_batch": cfg.data.batch_size, "length": length,
                         "seconds": time.perf_counter() - start}
    return plans


# --------------------------------------------------------------------------------------------------
# training steps under the launched strategy
# --------------------------------------------------------------------------------------------------


def steps(job: dict[str, Any]) -> dict[str, Any]:
    """For each row (checkpointing × precision) under the strategy ``accelerate launch`` set up: build
    the model, apply the strategy, run ``job["warmup"]`` + ``job["steps"]`` training steps on the
    planner's synthetic batch; report the peak allocated above what was allocated before, and the
    median time of the timed steps. Rows run one after another in this process; one that fails is
    reported and the next one still runs."""
    results = []
    for row in job["rows"]:
        try:
            results.append({**row, **_steps_of_row(job, row)})
        except Exception as err:  # one row's failure is that row's result
            results.append({**row, "error": _summary(err)})
        _release()
    return {"rows": results}


def _steps_of_row(job: dict[str, Any], row: dict[str, str]) -> dict[str, Any]:
    from accelerate.state import AcceleratorState, GradientState

    from dist_audio.models import build_model
    from dist_audio.objectives import build_objective
    from dist_audio.plan.planner import config_workload
    from dist_audio.train.optim import make_optimizer
    from dist_audio.train.parallelize import LaunchStrategy, clip_grad_norm, make_accelerator, setup_model_and_optimizer

    AcceleratorState._reset_state()  # a new precision per row; the process group stays
    GradientState._reset_state()
    precision = "no" if row["precision"] == "fp32" else row["precision"]
    cfg = load_config(job["config"], [*job["overrides"], "data.shards=unused", f"train.mixed_precision={precision}",
                                      f"train.activation_checkpointing={row['activation_checkpointing']}"])
    strategy = LaunchStrategy.from_environment()
    accelerator = make_accelerator(cfg.train, strategy, job["batch"], grad_clip=cfg.optim.grad_clip)
    device = accelerator.device
    torch.manual_seed(0)
    model, objective = build_model(cfg.model), build_objective(cfg.model, cfg.data)
    batch = {k: v.to(device) if torch.is_tensor(v) else v
             for k, v in config_workload(cfg).make_batch(job["batch"], job["length"]).items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model, optimizer, info = setup_model_and_optimizer(accelerator, strategy, model,
                                                       lambda m: make_optimizer(m, cfg.optim), cfg.train)
    times, losses = [], []
    for index in range(job["warmup"] + job["steps"]):
        _sync(device)
        start = time.perf_counter()
        loss, _ = objective.loss(model, batch)
        accelerator.backward(loss)
        clip_grad_norm(accelerator, model, cfg.optim.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        losses.append(float(loss))
        if index >= job["warmup"]:
            times.append(time.perf_counter() - start)
    result = {"strategy_in_effect": info.summary_lines()[0].removeprefix("strategy: "),
              "step_s": sorted(times)[len(times) // 2], "losses": losses}
    if device.type == "cuda":
        result["peak_allocated_gib"] = (torch.cuda.max_memory_allocated(device) - before) / GIB
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    del model, optimizer, accelerator
    return result


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _summary(err: BaseException) -> str:
    """The exception and where it was raised (last frames), short enough for a report line."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)[-3:]
    where = "; ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames)
    message = str(err).strip().splitlines()
    return f"{type(err).__name__}: {message[0] if message else ''} (at {where})"[:1500]


# --------------------------------------------------------------------------------------------------
# recurrent generation
# --------------------------------------------------------------------------------------------------


def generate(job: dict[str, Any]) -> dict[str, Any]:
    """Samples/s of recurrent SaShiMi generation per batch size: eager ``generate`` and the period
    sampler captured in a CUDA graph (``PeriodSampler``); the graphed samples' log-likelihood is
    checked against the model's convolution mode on the same tokens."""
    from dist_audio.models import build_model
    from dist_audio.models.heads import make_head
    from dist_audio.objectives.autoregressive import PeriodSampler
    from dist_audio.objectives.autoregressive import generate as eager_generate

    device = torch.device(job["device"])
    cfg = load_config(job["config"], [*job["overrides"], "data.shards=unused"])
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).eval()
    head = make_head(cfg.model.bits, cfg.model.head, cfg.model.n_mixtures)
    first = 2 ** (cfg.model.bits - 1)
    rows = []
    for batch in job["batches"]:
        row: dict[str, Any] = {"batch": batch}
        try:
            if batch in job["eager_batches"]:
                eager_generate(model, head, num=batch, steps=16, first_token=first)  # warm-up
                _sync(device)
                start = time.perf_counter()
                eager_generate(model, head, num=batch, steps=job["eager_steps"], first_token=first)
                _sync(device)
                row["eager_samples_per_s"] = batch * job["eager_steps"] / (time.perf_counter() - start)
            sampler = PeriodSampler(model, head, batch, first_token=first, cuda_graph=job["cuda_graph"])
            sampler.run(2)  # warm-up (already captured)
            _sync(device)
            start = time.perf_counter()
            tokens, log_likelihood = sampler.run(job["periods"])
            _sync(device)
            seconds = time.perf_counter() - start
            row["samples_per_s"] = tokens.numel() / seconds
            row["capture_s"] = sampler.capture_seconds
            row["likelihood_rel_diff"] = _likelihood_check(model, head, tokens[:2], log_likelihood[:2], first)
        except Exception as err:
            row["error"] = _summary(err)
        rows.append(row)
        _release()
    return {"rows": rows, "period": int(math.prod(cfg.model.pool))}


def _likelihood_check(model, head, tokens: torch.Tensor, recurrent: torch.Tensor, first: int) -> float:
    """Largest relative difference between the sampler's log-likelihood of its tokens (recurrent mode,
    accumulated while sampling) and the convolution mode's on the same tokens."""
    x = torch.cat([torch.full_like(tokens[:, :1], first), tokens[:, :-1]], dim=1)
    with torch.inference_mode():
        conv = head.log_prob_bins(model(x)).gather(-1, tokens[..., None])[..., 0].double().sum(-1)
    return float(((recurrent - conv).abs() / conv.abs().clamp_min(1e-9)).max())


# --------------------------------------------------------------------------------------------------
# auto_fit under a real OOM
# --------------------------------------------------------------------------------------------------


def auto_fit(job: dict[str, Any]) -> dict[str, Any]:
    """Train ``job["steps"]`` steps unconstrained (its peak measured), then with ``train.auto_fit`` and
    the process capped by ``set_per_process_memory_fraction`` below that peak (each cap in
    ``job["cap_fractions"]`` of the step's activation memory, until one provokes an OOM); compare."""
    from accelerate.state import AcceleratorState, GradientState

    from dist_audio.train.trainer import Trainer, make_accelerator

    def train(name: str, cap_bytes: int | None) -> dict[str, Any]:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        cfg = load_config(job["config"], [*job["overrides"], f"train.name={name}", "train.auto_fit=true"])
        accelerator = make_accelerator(cfg)
        device = accelerator.device
        if device.type == "cuda":
            _release()
            torch.cuda.reset_peak_memory_stats(device)
        trainer = Trainer(cfg, accelerator)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if cap_bytes is not None:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(cap_bytes / total, device)
        try:
            result = trainer.train()
        finally:
            if cap_bytes is not None:
                torch.cuda.set_per_process_memory_fraction(1.0, device)
        out = {"losses": [result.losses[k] for k in sorted(result.losses)], "samples_seen": trainer.state.samples_seen,
               "splits": trainer.auto_fit.splits, "oom_retries": trainer.auto_fit.retries,
               "global_batch": trainer.batch.global_batch}
        if device.type == "cuda":
            out["before_gib"] = before / GIB
            out["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
            out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
        accelerator.end_training()
        del trainer
        return out

    reference = train("reference", None)
    runs = []
    if torch.cuda.is_available():
        for fraction in job["cap_fractions"]:
            # the cap is on reserved memory: what the step held before it started, plus a share of its growth
            cap = reference["before_gib"] + fraction * (reference["peak_gib"] - reference["before_gib"])
            run: dict[str, Any] = {"cap_fraction": fraction, "cap_gib": cap}
            try:
                run |= train(f"capped-{fraction}", int(cap * GIB))
            except Exception as err:  # e.g. AutoFitExhausted: the halved step did not fit either; a higher cap next
                run["error"] = _summary(err)
            runs.append(run)
            if "error" not in run and run["oom_retries"]:
                break
    else:
        runs.append({"cap_gib": None, **train("unconstrained-auto-fit", None)})
    return {"reference": reference, "runs": runs}


WORKERS = {"plan": plan, "steps": steps, "generate": generate, "auto_fit": auto_fit}


def main() -> None:
    kind, job_path = sys.argv[1], Path(sys.argv[2])
    job = json.loads(job_path.read_text())
    result = WORKERS[kind](job)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(job["out"]).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
    exit_without_teardown(0)  # no interpreter teardown after the collectives (see its docstring)
