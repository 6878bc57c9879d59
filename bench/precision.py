"""fp32 against bf16 under every strategy, for the two seed models at full size, 2 CPU processes.

For seed-000 SaShiMi and seed-003 TF-SWA, each strategy is launched twice with ``accelerate launch``
(gloo, ``bench/strategies.py``'s worker): ``train.mixed_precision=no`` and ``bf16``, both with the
seed configs' own activation checkpointing (``blocks``). Reported per rank: the median optimizer-step
time over the timed steps and the peak RSS rise above the process's start. How bf16 runs differs per
strategy (``docs/strategies.md``): autocast under DDP, bf16 parameters with an fp32 master under
DeepSpeed, bf16 all-gathers of fp32 shards under FSDP2.

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu python bench/precision.py [--out bench/results/precision.md]

This CPU has no bf16 matrix units, so bf16 here shows the memory side and the numerics, not GPU speed.
Run with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors return to the OS and RSS follows live memory.
Tens of minutes on 2 idle cores at full size; ``--seconds`` shortens the segments.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.strategies import STRATEGIES, run_strategy  # noqa: E402
from dist_audio.config import load_config  # noqa: E402
from dist_audio.plan.planner import samples_per_second  # noqa: E402

SEEDS = {"seed-000 SaShiMi": ROOT / "configs/sashimi/seed-000.yaml",
         "seed-003 TF-SWA": ROOT / "configs/tfswa/seed-003.yaml"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the markdown report here too")
    parser.add_argument("--strategies", nargs="*", default=STRATEGIES, help=f"subset of {STRATEGIES}")
    parser.add_argument("--models", nargs="*", default=list(SEEDS), help=f"subset of {list(SEEDS)}")
    parser.add_argument("--seconds", type=float, help="segment seconds (default: each seed config's own)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run (after one warm-up)")
    args = parser.parse_args()

    command = "OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu MALLOC_MMAP_THRESHOLD_=65536 python bench/precision.py " + \
        " ".join(sys.argv[1:])
    lines = ["# fp32 vs bf16 per strategy (CPU, 2 processes)", "", f"Command: `{command.strip()}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
             f"{torch.__version__}; load average before: {os.getloadavg()}", ""]
    for model in args.models:
        cfg = load_config(SEEDS[model], ["data.shards=unused"])
        seconds = args.seconds or cfg.data.segment_seconds
        length = round(seconds * samples_per_second(cfg))
        if cfg.model.name == "sashimi":
            length -= length % 16  # whole coarse steps of the pooling
        lines += [f"## {model}: micro-batch {cfg.data.batch_size} × {seconds:g} s ({length:,} steps), activation "
                  f"checkpointing {cfg.train.activation_checkpointing}", "",
                  "| strategy | fp32 step s | bf16 step s | bf16/fp32 time | fp32 peak RSS rise MiB (rank 0, 1) | "
                  "bf16 peak RSS rise MiB (rank 0, 1) | bf16 in effect |", "|---|---|---|---|---|---|---|"]
        for strategy in args.strategies:
            runs = {precision: run_strategy(strategy, config=SEEDS[model], precision=precision,
                                            batch=cfg.data.batch_size, length=length, steps=args.steps)
                    for precision in ("no", "bf16")}
            step = {p: max(r["step_s"] for r in ranks) for p, ranks in runs.items()}
            rss = {p: ", ".join(f"{r['peak_rss_above_start_mib']:.0f}" for r in ranks) for p, ranks in runs.items()}
            effect = next(line for line in runs["bf16"][0]["info"] if line.startswith("precision:"))
            lines.append(f"| {strategy} | {step['no']:.2f} | {step['bf16']:.2f} | {step['bf16'] / step['no']:.2f} | "
                         f"{rss['no']} | {rss['bf16']} | {effect.removeprefix('precision: bf16: ')} |")
            print(lines[-1], flush=True)
        lines.append("")
    lines.append(f"Load average after: {os.getloadavg()}.")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
