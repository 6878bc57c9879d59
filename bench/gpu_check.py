"""Verify the GPU paths on one GPU in one command: ``python bench/gpu_check.py --out DIR [--dry-run]``.

Writes ``DIR/gpu_check.json`` (``{"checks": [{"name", "status": pass|fail|skipped, "detail", ...}]}``)
and ``DIR/gpu_check.md``, rewritten after every check so a killed run still leaves a report:

1. ``test_mode/<strategy>/<precision>/<model>``: ``accelerate launch --config_file
   configs/accelerate/<strategy>.yaml --num_processes 1 launch/train.py --test-mode`` (train,
   checkpoint, resume, validate, EMA) for both debug models, every strategy, fp32 / bf16 / fp16;
2. ``memory/<config>/<strategy>/<checkpointing>/<precision>``: one full-size training step of the
   seed-000 SaShiMi and the seed-003 TF-SWA per planner row that fits this GPU, peak allocated beside
   the planner's prediction (target ±15 %);
3. ``throughput/<config>/<precision>``: training samples/s (sc09 SaShiMi) and audio-s/s (seed-003);
4. ``generate/<config>/batch<N>``: recurrent generation with a period captured in a CUDA graph;
5. ``auto_fit``: a real CUDA OOM under ``set_per_process_memory_fraction``; the run goes on with the
   same global batch and losses as an unconstrained one.

Every check runs in its own child process with its own time limit (the whole run stays under 8 minutes
on an H100/H200); a failure is recorded with its summarised traceback and the next check runs.
``--dry-run`` runs the same script on the CPU with tiny shapes and a subset of the launches (CI runs
it): what has no CPU form (CUDA graphs, memory caps, the CUDA allocator) is skipped with the reason,
everything around it still runs. How to run it on a fresh machine: docs/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STRATEGIES = ("single", "zero2", "zero3", "zero3_offload", "fsdp", "fsdp_offload")
MEMORY_CONFIGS = ("sashimi/seed-000", "tfswa/seed-003")
MEMORY_TOLERANCE = 0.15  # |measured − predicted| / predicted per row
GENERATION_TARGET = 16_000  # samples/s at batch 16
GENERATION_GOAL = 256_000  # 16 streams of 16 kHz in real time
LOSS_RTOL = 1e-4  # auto_fit: same losses with split micro-batches (float summation order only)
GIB = 2**30
PHASES = ("setup", "test_mode", "memory", "throughput", "generate", "auto_fit")  # report order, by name prefix


@dataclass
class Mode:
    """Sizes and time limits of a run: the real one on a GPU, or the tiny CPU dry run."""

    dry_run: bool
    test_mode: list[tuple[str, str, str]]  # (strategy, precision, model) launched
    precisions: tuple[str, ...]
    memory_strategies: tuple[str, ...]
    memory_overrides: list[str]
    throughput_overrides: dict[str, list[str]]
    throughput_steps: tuple[int, int]  # warm-up, timed
    generate: dict[str, Any]
    auto_fit_overrides: list[str]
    parallel: int
    limits: dict[str, float]  # seconds per phase


def make_mode(dry_run: bool) -> Mode:
    if dry_run:
        return Mode(
            dry_run=True,
            # one DeepSpeed and one FSDP2 launch, both with offload: the launch path of every strategy
            test_mode=[("zero3_offload", "bf16", "sashimi"), ("fsdp_offload", "fp32", "tfswa")],
            precisions=("fp32", "bf16", "fp16"),
            memory_strategies=("single",),
            memory_overrides=["data.segment_seconds=0.004"],
            throughput_overrides={"sashimi/sc09": ["data.batch_size=2", "data.segment_seconds=0.016"],
                                  "tfswa/seed-003": ["data.segment_seconds=0.02"]},
            throughput_steps=(1, 1),
            generate={"batches": [1, 2], "eager_batches": [2], "eager_steps": 16, "periods": 2, "cuda_graph": False},
            auto_fit_overrides=["data.batch_size=4", "data.segment_seconds=0.1", "train.max_steps=2"],
            parallel=2,
            limits={"setup": 120, "launches": 240, "throughput": 120, "generate": 120, "auto_fit": 120},
        )
    return Mode(
        dry_run=False,
        test_mode=[(s, p, m) for s in STRATEGIES for p in ("fp32", "bf16", "fp16") for m in ("sashimi", "tfswa")],
        precisions=("fp32", "bf16", "fp16"),
        memory_strategies=STRATEGIES,
        memory_overrides=[],
        throughput_overrides={"sashimi/sc09": [], "tfswa/seed-003": []},
        throughput_steps=(2, 5),
        generate={"batches": [1, 16, 256], "eager_batches": [16], "eager_steps": 256, "periods": 64,
                  "cuda_graph": True},
        auto_fit_overrides=["data.batch_size=16", "data.segment_seconds=1.0", "train.max_steps=3"],
        parallel=min(10, max(2, (os.cpu_count() or 2) - 2)),
        # worst case 465 s when every phase runs to its limit; about 4 minutes expected (docs/gpu.md)
        limits={"setup": 90, "launches": 210, "throughput": 60, "generate": 60, "auto_fit": 45},
    )


# --------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------


class Report:
    """The checks so far, written as JSON and markdown after every change."""

    def __init__(self, out: Path, mode: Mode, environment: dict[str, Any]):
        self.out, self.mode, self.environment = out, mode, environment
        self.checks: list[dict[str, Any]] = []
        self.jobs: list[dict[str, Any]] = []  # every child process: how long it took (to tune the limits)
        self.start = time.perf_counter()

    def add(self, name: str, status: str, detail: str, **values: Any) -> None:
        assert status in ("pass", "fail", "skipped"), status
        self.checks.append({"name": name, "status": status, "detail": detail, **values})
        print(f"[{time.perf_counter() - self.start:6.1f} s] {status:7s} {name}: {detail}", flush=True)
        self.write()

    def write(self) -> None:
        seconds = round(time.perf_counter() - self.start, 1)
        counts = {s: sum(c["status"] == s for c in self.checks) for s in ("pass", "fail", "skipped")}
        data = {"dry_run": self.mode.dry_run, "seconds": seconds, "counts": counts, **self.environment,
                "checks": self.checks, "jobs": self.jobs}
        (self.out / "gpu_check.json").write_text(json.dumps(data, indent=1) + "\n")
        lines = [f"# GPU check{' (dry run on CPU)' if self.mode.dry_run else ''}", "",
                 f"`python bench/gpu_check.py {' '.join(sys.argv[1:])}`: {seconds} s; "
                 f"{counts['pass']} pass, {counts['fail']} fail, {counts['skipped']} skipped.", "",
                 *[f"- {k}: {v}" for k, v in self.environment.items()], "",
                 "| check | status | detail |", "|---|---|---|"]
        in_order = sorted(self.checks, key=lambda c: (PHASES.index(c["name"].split("/")[0]), c["name"]))
        lines += [f"| {c['name']} | {c['status']} | {c['detail'].replace('|', '/')} |" for c in in_order]
        lines += ["", "Child processes (phase limits: " + ", ".join(f"{k} {v:g} s" for k, v in self.mode.limits.items())
                  + "):", "", "| job | phase | seconds | exit |", "|---|---|---|---|"]
        for j in self.jobs:
            ended = "not started" if j["not_started"] else "killed" if j["timed_out"] else j["exit"]
            lines.append(f"| {j['job']} | {j['phase']} | {j['seconds']} | {ended} |")
        (self.out / "gpu_check.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------
# child processes
# --------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One child process; ``done(job)`` reports it and may return follow-up jobs."""

    name: str
    argv: list[str]
    result: Path | None
    done: Callable[[Job], list[Job] | None]
    gpu_gib: float = 1.0  # held on the GPU while it runs (to keep concurrent jobs within memory)
    limit: float = 600.0
    rc: int | None = None
    output: str = ""
    seconds: float = 0.0
    timed_out: bool = False
    not_started: bool = False
    log_name: str = ""
    proc: subprocess.Popen | None = field(default=None, repr=False)
    log: Any = field(default=None, repr=False)
    started: float = 0.0

    def value(self) -> dict[str, Any] | None:
        if self.result is not None and self.result.is_file():
            return json.loads(self.result.read_text())
        return None

    def failure(self) -> str:
        """Why the process did not give a result: time limit, exit status, the error lines of its output."""
        if self.not_started:
            return "not started: its phase's time limit was reached"
        if self.timed_out:
            return f"killed at its time limit after {self.seconds:.0f} s (log: {self.log_name})"
        lines = [ln for ln in self.output.splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln or "error:" in ln or "failed" in ln]
        tail = " / ".join((errors or lines)[-3:])[-1200:]
        return f"exit {self.rc}: {tail} (log: {self.log_name})"


def run_jobs(jobs: list[Job], *, parallel: int, deadline: float, env: dict[str, str], logs: Path,
             gpu_budget_gib: float = math.inf) -> list[Job]:
    """Run jobs ``parallel`` at a time (and within ``gpu_budget_gib`` together), each killed at its own
    limit or at ``deadline``; follow-up jobs from ``done`` go to the front of the queue. Returns every job."""
    queue, running, finished = list(jobs), [], []
    while queue or running:
        held = sum(j.gpu_gib for j in running)
        while queue and len(running) < parallel and (not running or held + queue[0].gpu_gib <= gpu_budget_gib):
            job = queue.pop(0)
            if time.perf_counter() > deadline:
                job.not_started = True
                finished.append(job)
                queue[:0] = job.done(job) or []
                continue
            path = logs / f"{job.name.replace('/', '_')}.log"
            job.log, job.log_name = open(path, "w+"), str(path.relative_to(logs.parents[1]))
            job.started = time.perf_counter()
            argv = [str(free_port()) if a == PORT else a for a in job.argv]  # picked now: free at start
            job.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=job.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            running.append(job)
            held += job.gpu_gib
        time.sleep(0.2)
        for job in list(running):
            elapsed = time.perf_counter() - job.started
            if job.proc.poll() is None and (elapsed > job.limit or time.perf_counter() > deadline):
                job.timed_out = True
                os.killpg(job.proc.pid, 9)  # the job's own process group: its launcher and workers
            if job.proc.poll() is None:
                continue
            running.remove(job)
            job.rc, job.seconds = job.proc.returncode, elapsed
            job.log.seek(0)
            job.output = job.log.read()
            job.log.close()
            finished.append(job)
            queue[:0] = job.done(job) or []
    return finished


PORT = "{free port}"  # in a job's argv: replaced by a free port when the job starts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_argv(strategy: str, script: str, *args: str) -> list[str]:
    """``accelerate launch`` at world size 1 under ``configs/accelerate/<strategy>.yaml``."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / f"{strategy}.yaml"), "--num_processes", "1",
            "--main_process_port", PORT, str(ROOT / script), *args]


def worker_job(work: Path, name: str, kind: str, job: dict[str, Any], done: Callable[[Job], list[Job] | None], *,
               strategy: str | None = None, gpu_gib: float = 1.0, limit: float = 600.0) -> Job:
    """A ``bench/gpu_workers.py KIND`` job, under ``accelerate launch`` with ``strategy``'s file when given
    (``single`` runs as plain ``python``, as ``python launch/train.py`` does: the same process setup)."""
    slug = name.replace("/", "_")
    job_file, result = work / "jobs" / f"{slug}.json", work / "jobs" / f"{slug}.out.json"
    job_file.write_text(json.dumps({**job, "out": str(result)}))
    argv = (launch_argv(strategy, "bench/gpu_workers.py", kind, str(job_file)) if strategy not in (None, "single")
            else [sys.executable, str(ROOT / "bench" / "gpu_workers.py"), kind, str(job_file)])
    return Job(name, argv, result, done, gpu_gib=gpu_gib, limit=limit)


# --------------------------------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------------------------------


class GpuCheck:
    def __init__(self, out: Path, mode: Mode, wanted: set[str]):
        self.out, self.mode, self.wanted = out, mode, wanted
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=out))
        for sub in ("jobs", "logs", "runs", "data"):
            (self.work / sub).mkdir()
        self.env = child_environment(mode.dry_run)
        self.report = Report(out, mode, environment(mode))
        self.shards: dict[str, Path] = {}
        self.gpu_gib = gpu_memory_gib() if not mode.dry_run else 0.0

    def run(self, jobs: list[Job], phase: str, *, parallel: int = 1, gpu_budget_gib: float = math.inf) -> None:
        """``run_jobs`` within the phase's time limit; each job's time goes into the report."""
        finished = run_jobs(jobs, parallel=parallel, deadline=time.perf_counter() + self.mode.limits[phase],
                            env=self.env, logs=self.work / "logs", gpu_budget_gib=gpu_budget_gib)
        self.report.jobs += [{"job": job.name, "phase": phase, "seconds": round(job.seconds, 1), "exit": job.rc,
                              "timed_out": job.timed_out, "not_started": job.not_started} for job in finished]
        self.report.write()

    # ---- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Demo shards for the test-mode runs and auto_fit (``data_prep``: synthetic audio, sharded), and
        DeepSpeed's CPU Adam built once (a JIT-compiled op that every offload launch would wait for)."""
        shards = Job("setup/data", [sys.executable, "-c", SHARD_SCRIPT, str(self.work / "data")], None,
                     lambda job: None, limit=self.mode.limits["setup"])
        cpu_adam = Job("setup/deepspeed_cpu_adam", [sys.executable, "-c", CPU_ADAM_SCRIPT], None, lambda job: None,
                       limit=self.mode.limits["setup"])
        self.run([shards, cpu_adam], "setup", parallel=2)
        report = self.report.add
        if shards.rc == 0:
            self.shards = {"sashimi": self.work / "data" / "speech", "tfswa": self.work / "data" / "musdb"}
            report("setup/data", "pass", f"demo corpus sharded in {shards.seconds:.0f} s")
        else:
            report("setup/data", "fail", f"no shards, so test mode and auto_fit cannot run: {shards.failure()}")
        if cpu_adam.rc == 0:
            report("setup/deepspeed_cpu_adam", "pass", f"DeepSpeedCPUAdam op loaded in {cpu_adam.seconds:.0f} s")
        else:
            report("setup/deepspeed_cpu_adam", "fail", f"offload launches will fail or build it: {cpu_adam.failure()}")

    def clean(self) -> None:
        """Drop the shards and run directories; the logs and job files stay for the post-mortem."""
        for sub in ("data", "runs"):
            shutil.rmtree(self.work / sub, ignore_errors=True)

    # ---- 1 + 2: launches, concurrently ----------------------------------------------------------

    def launches(self) -> None:
        """Check 1 (test mode per strategy/precision/model) and check 2 (memory per planner row) share
        the GPU: neither is timed, and each process's peak is its own allocator's."""
        jobs = ((self.memory_plan_jobs() if "memory" in self.wanted else [])  # the planner first: steps wait for it
                + (self.test_mode_jobs() if "test_mode" in self.wanted else []))
        self.run(jobs, "launches", parallel=self.mode.parallel,
                 gpu_budget_gib=0.8 * self.gpu_gib if self.gpu_gib else math.inf)

    def test_mode_jobs(self) -> list[Job]:
        mode, jobs = self.mode, []
        launched = set(mode.test_mode)
        for precision in mode.precisions:  # fp32 of every strategy first: what a time-out leaves out is fp16
            for strategy in STRATEGIES:
                for model in ("sashimi", "tfswa"):
                    name = f"test_mode/{strategy}/{precision}/{model}"
                    if precision == "fp16" and mode.dry_run:
                        self.report.add(name, "skipped", "fp16 needs CUDA (refused on CPU with exit 2)")
                    elif (strategy, precision, model) not in launched:
                        ran = " and ".join("/".join(case) for case in mode.test_mode)
                        self.report.add(name, "skipped", f"dry run: launched on the GPU only (the same launch path "
                                                         f"runs here for {ran})")
                    elif not self.shards:
                        self.report.add(name, "fail", "no demo shards (setup/data failed)")
                    else:
                        jobs.append(self.test_mode_job(name, strategy, precision, model))
        return jobs

    def test_mode_job(self, name: str, strategy: str, precision: str, model: str) -> Job:
        runs = self.work / "runs" / name.replace("/", "_")
        argv = launch_argv(strategy, "launch/train.py", "--config", str(ROOT / "configs" / model / "debug.yaml"),
                           "--set", f"data.shards={self.shards[model]}", "--set", f"train.runs_dir={runs}",
                           "--set", f"train.mixed_precision={'no' if precision == 'fp32' else precision}",
                           "--set", "optim.ema_decay=0.99", "--test-mode")

        def done(job: Job) -> None:
            in_effect = next((ln.split("strategy: ", 1)[1] for ln in job.output.splitlines() if "strategy: " in ln),
                             "?")
            passed = next((ln.split("test mode passed: ", 1)[1].split("; run directory")[0]
                           for ln in job.output.splitlines() if "test mode passed" in ln), None)
            if passed:  # "losses {1: 5.74027..., ...}" → "losses 5.740 5.374 ..."
                losses = [float(v.split(":")[1]) for v in passed.removeprefix("losses {").rstrip("}").split(",")]
                passed = "losses " + " ".join(f"{v:.4f}" for v in losses)
            if job.rc == 0 and passed:
                self.report.add(name, "pass", f"{in_effect}; {passed}; {job.seconds:.0f} s", seconds=job.seconds)
            else:
                self.report.add(name, "fail", f"{in_effect}; {job.failure()}", seconds=job.seconds)

        return Job(name, argv, None, done, gpu_gib=2.0, limit=self.mode.limits["launches"])

    def memory_plan_jobs(self) -> list[Job]:
        """The planner for both configs (one process), then one launch per strategy running its fitting
        rows one after another."""
        configs = {str(ROOT / "configs" / f"{config}.yaml"): config.split("/")[1] for config in MEMORY_CONFIGS}
        overrides = self.mode.memory_overrides

        def done(job: Job) -> list[Job]:
            plans = job.value() or {}
            jobs = []
            for path, short in configs.items():
                if path not in plans:
                    self.report.add(f"memory/{short}", "fail", f"planner failed: {job.failure()}")
                    continue
                jobs += self.memory_step_jobs(path, short, overrides, plans[path])
            return jobs

        job = {"configs": list(configs), "overrides": overrides, "gpu_memory": int((self.gpu_gib or 80) * GIB)}
        return [worker_job(self.work, "plan", "plan", job, done, gpu_gib=0.0, limit=self.mode.limits["launches"])]

    def memory_step_jobs(self, path: str, short: str, overrides: list[str], plan: dict[str, Any]) -> list[Job]:
        rows: dict[str, list[dict[str, Any]]] = {}
        for row in plan["rows"]:
            strategy = "single" if row["strategy"] == "ddp" else row["strategy"]  # world size 1
            name = f"memory/{short}/{strategy}/{row['activation_checkpointing']}/{row['precision']}"
            if not row["fits"]:
                self.report.add(name, "skipped", f"the planner says it does not fit: "
                                                 f"{row['per_gpu_gib']['total']:.2f} GiB predicted")
            elif strategy not in self.mode.memory_strategies:
                self.report.add(name, "skipped", "dry run: launched on the GPU only")
            else:
                rows.setdefault(strategy, []).append({"name": name, **row})
        jobs = []
        for strategy, chosen in rows.items():
            step = {"config": path, "overrides": overrides,
                    "rows": [{"activation_checkpointing": r["activation_checkpointing"], "precision": r["precision"]}
                             for r in chosen],
                    "batch": plan["micro_batch"], "length": plan["length"], "warmup": 0, "steps": 1}
            gib = max(r["per_gpu_gib"]["total"] for r in chosen) + 1.0
            jobs.append(worker_job(self.work, f"steps/{short}/{strategy}", "steps", step, self.memory_rows_done(chosen),
                                   strategy=strategy, gpu_gib=gib, limit=self.mode.limits["launches"]))
        return jobs

    def memory_rows_done(self, chosen: list[dict[str, Any]]) -> Callable[[Job], None]:
        from dist_audio.plan.planner import CUDA_RUNTIME_RESERVE

        reserve = CUDA_RUNTIME_RESERVE / GIB

        def done(job: Job) -> None:
            measured = (job.value() or {}).get("rows")
            for index, row in enumerate(chosen):
                total = row["per_gpu_gib"]["total"]
                got = measured[index] if measured and index < len(measured) else None
                if got is None:
                    self.report.add(row["name"], "fail", job.failure())
                elif "error" in got:
                    self.report.add(row["name"], "fail", got["error"])
                elif "peak_allocated_gib" not in got:
                    self.report.add(row["name"], "skipped",
                                    f"no CUDA allocator on the CPU: one step ran under {got['strategy_in_effect']} "
                                    f"(loss {got['losses'][0]:.3f}); predicted {total:.3f} GiB",
                                    predicted_gib=total)
                else:
                    predicted = total - reserve  # the CUDA context etc. is outside the allocator
                    error = got["peak_allocated_gib"] / predicted - 1
                    status = "pass" if abs(error) <= MEMORY_TOLERANCE else "fail"
                    self.report.add(row["name"], status,
                                    f"max allocated {got['peak_allocated_gib']:.3f} GiB vs predicted {predicted:.3f} "
                                    f"GiB ({total:.3f} − {reserve:.1f} context): {100 * error:+.1f} % "
                                    f"(target ±{100 * MEMORY_TOLERANCE:.0f} %); reserved "
                                    f"{got['peak_reserved_gib']:.3f} GiB; {got['strategy_in_effect']}",
                                    predicted_gib=predicted, measured_gib=got["peak_allocated_gib"],
                                    reserved_gib=got["peak_reserved_gib"], error=error)

        return done

    # ---- 3: throughput --------------------------------------------------------------------------

    def throughput(self) -> None:
        from dist_audio.config import load_config
        from dist_audio.plan.planner import samples_per_second

        jobs = []
        for config, overrides in self.mode.throughput_overrides.items():
            path = str(ROOT / "configs" / f"{config}.yaml")
            cfg = load_config(path, [*overrides, "data.shards=unused"])
            multiple = math.prod(cfg.model.pool) if cfg.model.name == "sashimi" else 1
            length = multiple * math.ceil(cfg.data.segment_seconds * samples_per_second(cfg) / multiple)
            rows = [{"activation_checkpointing": cfg.train.activation_checkpointing, "precision": p}
                    for p in ("fp32", "bf16")]
            warmup, timed = self.mode.throughput_steps
            step = {"config": path, "overrides": overrides, "rows": rows, "batch": cfg.data.batch_size,
                    "length": length, "warmup": warmup, "steps": timed}
            jobs.append(worker_job(self.work, f"throughput/{config.split('/')[1]}", "steps", step,
                                   self.throughput_done(config.split("/")[1], cfg, rows), strategy="single",
                                   limit=self.mode.limits["throughput"]))
        self.run(jobs, "throughput")

    def throughput_done(self, short: str, cfg: Any, rows: list[dict[str, str]]) -> Callable[[Job], None]:
        def done(job: Job) -> None:
            measured = (job.value() or {}).get("rows") or []
            for index, row in enumerate(rows):
                name = f"throughput/{short}/{row['precision']}"
                got = measured[index] if index < len(measured) else None
                if got is None or "error" in got:
                    self.report.add(name, "fail", got["error"] if got else job.failure())
                    continue
                per_s = cfg.data.batch_size / got["step_s"]
                seconds = cfg.data.segment_seconds
                what = (f"{per_s:.1f} samples/s ({per_s * seconds:.1f} audio-s/s)" if cfg.model.name == "sashimi"
                        else f"{per_s * seconds:.2f} audio-s/s ({per_s:.2f} samples/s)")
                finite = all(math.isfinite(v) for v in got["losses"])
                self.report.add(name, "pass" if finite else "fail",
                                f"{what}; step {got['step_s'] * 1000:.0f} ms at batch {cfg.data.batch_size} × "
                                f"{seconds:g} s, checkpointing {row['activation_checkpointing']}"
                                + ("" if finite else f"; non-finite loss {got['losses']}")
                                + (" (CPU, tiny shapes)" if self.mode.dry_run else ""),
                                samples_per_s=per_s, audio_s_per_s=per_s * seconds)

        return done

    # ---- 4: generation --------------------------------------------------------------------------

    def generation(self) -> None:
        config = "sashimi/seed-000"
        job = {"config": str(ROOT / "configs" / f"{config}.yaml"), "overrides": [],
               "device": "cpu" if self.mode.dry_run else "cuda", **self.mode.generate}
        short = config.split("/")[1]

        def done(job: Job) -> None:
            result = job.value()
            if result is None:
                self.report.add(f"generate/{short}", "fail", job.failure())
                return
            for row in result["rows"]:
                name, batch = f"generate/{short}/batch{row['batch']}", row["batch"]
                if "error" in row:
                    self.report.add(name, "fail", row["error"])
                    continue
                rate = row["samples_per_s"]
                eager = (f"; eager {row['eager_samples_per_s']:.0f} samples/s"
                         if "eager_samples_per_s" in row else "")
                check = f"log-likelihood vs convolution mode: rel. diff {row['likelihood_rel_diff']:.1e}"
                correct = row["likelihood_rel_diff"] < 1e-3
                if self.mode.dry_run:
                    self.report.add(name, "skipped" if correct else "fail",
                                    f"CUDA graphs have no CPU form: the period sampler ran eagerly, "
                                    f"{rate:.0f} samples/s{eager}; {check}", samples_per_s=rate)
                    continue
                target = ""
                ok = correct
                if batch == 16:
                    ok = ok and rate >= GENERATION_TARGET
                    target = (f"; target ≥ {GENERATION_TARGET}: {'met' if rate >= GENERATION_TARGET else 'missed'}"
                              f", goal {GENERATION_GOAL}: {'met' if rate >= GENERATION_GOAL else 'missed'}")
                self.report.add(name, "pass" if ok else "fail",
                                f"CUDA graph: {rate:.0f} samples/s ({rate / batch:.0f} per stream){target}{eager}; "
                                f"captured in {row['capture_s']:.1f} s; {check}", samples_per_s=rate)

        jobs = [worker_job(self.work, f"generate/{short}", "generate", job, done, limit=self.mode.limits["generate"])]
        self.run(jobs, "generate")

    # ---- 5: auto_fit ----------------------------------------------------------------------------

    def auto_fit(self) -> None:
        if not self.shards:
            self.report.add("auto_fit", "fail", "no demo shards (setup/data failed)")
            return
        overrides = [f"data.shards={self.shards['sashimi']}", f"train.runs_dir={self.work / 'runs' / 'auto_fit'}",
                     "train.checkpoint_every=1000", "train.val_every=1000", "log.audio_seconds=0",
                     "log.tensorboard=false", *self.mode.auto_fit_overrides]
        job = {"config": str(ROOT / "configs" / "sashimi" / "debug.yaml"), "overrides": overrides,
               "cap_fractions": [0.75, 0.9]}

        def done(job: Job) -> None:
            result = job.value()
            if result is None:
                self.report.add("auto_fit", "fail", job.failure())
                return
            reference, run = result["reference"], result["runs"][-1]
            if "error" in run:
                self.report.add("auto_fit", "fail", "; ".join(f"cap {r['cap_gib']:.3f} GiB: {r.get('error', 'ran')}"
                                                              for r in result["runs"]), runs=result["runs"])
                return
            diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(run["losses"], reference["losses"]))
            same = (len(run["losses"]) == len(reference["losses"]) and diff <= LOSS_RTOL
                    and run["global_batch"] == reference["global_batch"]
                    and run["samples_seen"] == reference["samples_seen"])
            summary = (f"global batch {run['global_batch']} (reference {reference['global_batch']}), samples "
                       f"{run['samples_seen']} ({reference['samples_seen']}), losses max rel. diff {diff:.1e}")
            if self.mode.dry_run:
                self.report.add("auto_fit", "skipped" if same else "fail",
                                "set_per_process_memory_fraction has no CPU form: no OOM provoked; the reference "
                                f"and the auto_fit run trained unconstrained: {summary}")
                return
            provoked = run["oom_retries"] > 0
            self.report.add("auto_fit", "pass" if provoked and same else "fail",
                            f"cap {run['cap_gib']:.3f} GiB (reference peak {reference['peak_gib']:.3f} GiB): "
                            f"{run['oom_retries']} OOM(s), micro-batches ×{run['splits']}; {summary}"
                            + ("" if provoked else "; no OOM was provoked"), runs=result["runs"])

        jobs = [worker_job(self.work, "auto_fit", "auto_fit", job, done, limit=self.mode.limits["auto_fit"])]
        self.run(jobs, "auto_fit")


SHARD_SCRIPT = """
import sys
from pathlib import Path
from data_prep.demo import make_demo_corpus
from data_prep.shard import shard_dataset
root = Path(sys.argv[1])
make_demo_corpus(root / "audio", seed=0)
shard_dataset(root / "audio" / "speech", root / "speech", layout="files", sample_rate=16000, channels=1,
              chunk_seconds=2.0, min_seconds=0.5, valid_fraction=0.25, max_per_shard=4, progress=False)
shard_dataset(root / "audio" / "musdb", root / "musdb", layout="musdb", sample_rate=16000, channels=2,
              chunk_seconds=4.0, min_seconds=1.0, max_per_shard=3, progress=False)
"""


CPU_ADAM_SCRIPT = "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"


def child_environment(dry_run: bool) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if dry_run:  # the CPU path even where a GPU is visible
        env |= {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    else:
        env.pop("DS_ACCELERATOR", None)
        env["OMP_NUM_THREADS"] = "2"
    return env


def gpu_memory_gib() -> float:
    import torch

    return torch.cuda.get_device_properties(0).total_memory / GIB


def environment(mode: Mode) -> dict[str, Any]:
    import torch

    info = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cpus": os.cpu_count()}
    if not mode.dry_run:
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / GIB, 1)}
    for package in ("accelerate", "deepspeed"):
        try:
            info[package] = __import__(package).__version__
        except Exception as err:  # reported, the checks that need it fail on their own
            info[package] = f"not importable: {err}"
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_check.md and gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="the same checks on the CPU with tiny shapes")
    parser.add_argument("--only", nargs="+", choices=PHASES[1:], metavar="CHECK",
                        help=f"run only these checks ({', '.join(PHASES[1:])}), e.g. to re-run one that failed")
    args = parser.parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA GPU visible (run with --dry-run to exercise the script on a CPU)", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only or PHASES)
    check = GpuCheck(args.out, make_mode(args.dry_run), wanted)
    phase_names = {"setup": "setup", "launches": "test_mode", "throughput": "throughput", "generation": "generate",
                   "auto_fit": "auto_fit"}
    phases = [(check.setup, wanted & {"test_mode", "memory", "auto_fit"}),
              (check.launches, wanted & {"test_mode", "memory"}), (check.throughput, wanted & {"throughput"}),
              (check.generation, wanted & {"generate"}), (check.auto_fit, wanted & {"auto_fit"})]
    for phase in [phase for phase, needed in phases if needed]:
        try:
            phase()
        except Exception as err:  # a broken phase is reported; the next one runs
            from bench.gpu_workers import _summary

            check.report.add(phase_names[phase.__name__], "fail", f"the check itself failed: {_summary(err)}")
    check.clean()
    check.report.write()
    counts = {s: sum(c["status"] == s for c in check.report.checks) for s in ("pass", "fail", "skipped")}
    print(f"{counts} in {time.perf_counter() - check.report.start:.0f} s; report: {args.out / 'gpu_check.md'}")
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
