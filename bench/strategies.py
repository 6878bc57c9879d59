"""Distribution strategies and activation checkpointing on the seed-000 SaShiMi (4.7 M parameters):

(a) per strategy at 2 CPU processes (``accelerate launch``, gloo): optimizer-step time and the memory
    of model states each rank holds (parameters + fp32 master copies + AdamW states, counted from the
    tensors themselves; gradients are transient and left out), and each rank's peak RSS;
(b) activation checkpointing, one process: activation memory kept for the backward pass (MemTracker,
    right after the forward, model output excluded), its peak over forward + backward, and the time
    of forward + backward, for ``none``, ``every_n`` (n=2) and ``blocks``.

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu python bench/strategies.py [--out bench/results/strategies.md]

About three minutes on 2 idle cores. CPU "offload" moves nothing physically here (host and device
are the same memory); it is timed to show its overhead and verified to be in effect.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dist_audio.config import load_config  # noqa: E402
from dist_audio.models import build_model  # noqa: E402
from dist_audio.objectives import build_objective  # noqa: E402

CONFIG = ROOT / "configs" / "sashimi" / "seed-000.yaml"
STRATEGIES = ["ddp", "zero2", "zero3", "zero3_offload", "fsdp", "fsdp_offload"]
SEED_000_MONO = ("data.interleave_stereo=false",)


def token_batch(batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 256, (batch, length), generator=gen)
    return {"x": torch.cat([torch.full((batch, 1), 128), y[:, :-1]], dim=1), "y": y}


# --------------------------------------------------------------------------------------------------
# (a) one strategy, run under accelerate launch
# --------------------------------------------------------------------------------------------------


def strategy_worker(args: argparse.Namespace) -> None:
    """Optimizer steps of ``--config`` at ``--batch`` × ``--length`` per rank under the launched strategy."""
    import resource

    from dist_audio.plan.planner import config_workload
    from dist_audio.train.parallelize import (
        LaunchStrategy,
        clip_grad_norm,
        make_accelerator,
        setup_model_and_optimizer,
    )

    cfg = load_config(args.config, ["data.shards=unused", f"train.mixed_precision={args.precision}", *args.set])
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.manual_seed(0)
    model, objective = build_model(cfg.model), build_objective(cfg.model, cfg.data)
    strategy = LaunchStrategy.from_environment()
    accelerator = make_accelerator(cfg.train, strategy, args.batch, grad_clip=1.0,
                                   deepspeed_cpu_adam=not args.torch_adam)
    model, optimizer, info = setup_model_and_optimizer(
        accelerator, strategy, model, lambda m: torch.optim.AdamW(m.param_groups(0.01), lr=1e-3), cfg.train)
    make_batch = config_workload(cfg).make_batch
    times, optimizer_times = [], []
    for step in range(args.steps + 1):
        torch.manual_seed(step * 10 + accelerator.process_index)
        batch = make_batch(args.batch, args.length)
        start = time.perf_counter()
        loss, _ = objective.loss(model, batch)
        accelerator.backward(loss)
        clip_grad_norm(accelerator, model, 1.0)
        optimizer_start = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        accelerator.wait_for_everyone()
        if step:  # the first step builds kernels and buffers
            times.append(time.perf_counter() - start)
            optimizer_times.append(time.perf_counter() - optimizer_start)
    states = model_state_bytes(model, optimizer)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"info": info.summary_lines(), "step_s": statistics.median(times),
              "optimizer_s": statistics.median(optimizer_times), **states, "peak_rss_mib": peak,
              "peak_rss_above_start_mib": peak - baseline}
    Path(args.out, f"rank{accelerator.process_index}.json").write_text(json.dumps(result))
    accelerator.end_training()


def _held(t: torch.Tensor) -> torch.Tensor:
    """The part of a parameter or state this rank stores (ZeRO-3 partition, DTensor shard, or all)."""
    if hasattr(t, "ds_tensor"):
        t = t.ds_tensor
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t


def _local_bytes(t: torch.Tensor) -> int:
    t = _held(t)
    return t.numel() * t.element_size()


def model_state_bytes(model, optimizer) -> dict[str, float]:
    """MiB of parameters, separate fp32 master copies and optimizer states stored on this rank."""
    inner = optimizer
    while hasattr(inner, "optimizer"):  # Accelerate wrapper -> DeepSpeed ZeRO optimizer -> torch AdamW
        inner = inner.optimizer
    params = list(model.parameters())
    # The optimizer's own parameters are fp32 master copies where they have their own storage (ZeRO-3 in
    # fp32 shares the partition). ZeRO-3 puts them into param_groups only during step(): take the
    # state keys too.
    storages = {_held(p).untyped_storage().data_ptr() for p in params if _held(p).numel()}
    optimized = {id(p): p for p in [*inner.state, *(p for g in inner.param_groups for p in g["params"])]}
    master = sum(_local_bytes(p) for p in optimized.values()
                 if _held(p).untyped_storage().data_ptr() not in storages)
    state = sum(_local_bytes(t) for s in inner.state.values() for t in s.values()
                if torch.is_tensor(t) and t.numel() > 1)
    mib = 2 ** 20
    return {"params_mib": sum(_local_bytes(p) for p in params) / mib, "master_mib": master / mib,
            "optim_state_mib": state / mib}


def run_strategy(name: str, *, config: Path = CONFIG, precision: str = "no", batch: int = 2, length: int = 1024,
                 steps: int = 3, overrides: tuple[str, ...] = (), torch_adam: bool = False) -> list[dict]:
    """``strategy_worker`` under ``accelerate launch`` with 2 processes; each rank's result."""
    with tempfile.TemporaryDirectory() as out, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "configs" / "accelerate" / f"{name}.yaml"), "--num_processes", "2",
                   "--main_process_port", str(port), __file__, "--worker", "--out", out, "--config", str(config),
                   "--precision", precision, "--steps", str(steps), "--length", str(length), "--batch", str(batch),
                   *(["--torch-adam"] if torch_adam else []), *[a for item in overrides for a in ("--set", item)]]
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]


# --------------------------------------------------------------------------------------------------
# (b) activation checkpointing trade-off, one process
# --------------------------------------------------------------------------------------------------


def checkpointing_tradeoff(length: int, repeats: int) -> list[dict]:
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    from dist_audio.train.parallelize import apply_activation_checkpointing

    cfg = load_config(CONFIG, ["data.shards=unused"])
    torch.manual_seed(0)
    base, objective = build_model(cfg.model), build_objective(cfg.model, cfg.data)
    batch = token_batch(1, length)
    rows, models = [], []
    for mode in ("none", "every_n", "blocks"):
        model = copy.deepcopy(base)
        wrapped = apply_activation_checkpointing(model, mode, every_n=2)
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            loss, _ = objective.loss(model, batch)
            held = tracker.get_tracker_snapshot()[torch.device("cpu")][_MemRefType.ACT]
            loss.backward()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")][_MemRefType.ACT]
        model.zero_grad(set_to_none=True)
        rows.append({"mode": mode, "wrapped": wrapped, "held_mib": held / 2**20, "peak_mib": peak / 2**20,
                     "time_s": float("inf")})
        models.append(model)
    for _ in range(repeats):  # modes interleaved, best of repeats: load drifts hit every mode alike
        for row, model in zip(rows, models):
            start = time.perf_counter()
            loss, _ = objective.loss(model, batch)
            loss.backward()
            row["time_s"] = min(row["time_s"], time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    return rows


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the markdown report here too")
    parser.add_argument("--strategies", nargs="*", default=STRATEGIES,
                        help=f"subset of {STRATEGIES} (none: only the checkpointing trade-off)")
    parser.add_argument("--length", type=int, default=1024, help="tokens per sample for the strategy runs")
    parser.add_argument("--batch", type=int, default=2, help="samples per rank for the strategy runs")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per strategy (after one warm-up)")
    parser.add_argument("--ac-length", type=int, default=8192, help="tokens for the checkpointing trade-off")
    parser.add_argument("--ac-repeats", type=int, default=3, help="timed forward+backward per mode (min taken)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", default=str(CONFIG), help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="no", help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--torch-adam", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        strategy_worker(args)
        return

    command = "OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu python bench/strategies.py " + " ".join(sys.argv[1:])
    lines = ["# Strategies and activation checkpointing (CPU)", "", f"Command: `{command.strip()}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
             f"{torch.__version__}; load average before: {os.getloadavg()}", "",
             f"## (a) 2 processes, seed-000 SaShiMi, {args.batch} x {args.length} tokens per rank", "",
             "| strategy | in effect | step s | params MiB/rank | fp32 master MiB/rank | AdamW MiB/rank "
             "| model states MiB/rank | peak RSS MiB (rank 0, 1) |",
             "|---|---|---|---|---|---|---|---|"]
    shape = dict(batch=args.batch, length=args.length, steps=args.steps, overrides=SEED_000_MONO)
    for name in args.strategies:
        ranks = run_strategy(name, **shape)
        r0 = ranks[0]
        total = r0["params_mib"] + r0["master_mib"] + r0["optim_state_mib"]
        effect = r0["info"][0].removeprefix("strategy: ") + "; " + r0["info"][2]
        lines.append(f"| {name} | {effect} | {max(r['step_s'] for r in ranks):.2f} | {r0['params_mib']:.1f} | "
                     f"{r0['master_mib']:.1f} | {r0['optim_state_mib']:.1f} | {total:.1f} | "
                     + ", ".join(f"{r['peak_rss_mib']:.0f}" for r in ranks) + " |")
        print(lines[-1], flush=True)
    if "zero3_offload" in args.strategies:  # the offloaded optimizer step: DeepSpeed's CPU Adam vs torch AdamW
        lines += ["", "Offloaded ZeRO-3 optimizer step, median over the timed steps (same run shape):", "",
                  "| optimizer on the CPU partitions | optimizer step s (rank 0, 1) | whole step s |", "|---|---|---|"]
        for torch_adam in (False, True):
            ranks = run_strategy("zero3_offload", torch_adam=torch_adam, **shape)
            lines.append(f"| {'torch AdamW' if torch_adam else 'DeepSpeedCPUAdam (default)'} | "
                         + ", ".join(f"{r['optimizer_s']:.3f}" for r in ranks)
                         + f" | {max(r['step_s'] for r in ranks):.2f} |")
            print(lines[-1], flush=True)
    rows = checkpointing_tradeoff(args.ac_length, args.ac_repeats)
    base = rows[0]
    lines += ["", f"## (b) activation checkpointing, seed-000 SaShiMi, 1 x {args.ac_length} tokens, one process",
              "", "| mode | blocks wrapped | activations kept after forward MiB | peak activations MiB "
              "| kept: x less | fwd+bwd s | time added |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['mode']} | {row['wrapped']} | {row['held_mib']:.0f} | {row['peak_mib']:.0f} | "
                     f"{base['held_mib'] / row['held_mib']:.1f}x | {row['time_s']:.2f} | "
                     f"{100 * (row['time_s'] / base['time_s'] - 1):+.0f}% |")
        print(lines[-1], flush=True)
    lines += ["", f"Load average after: {os.getloadavg()}. Timings on a shared, loaded machine are provisional."]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
