"""Memory planner: wall time per question, and predicted vs measured peak memory.

(a) the planner answering the seed questions (seed-000 on 1 × 24 GiB; seed-003 on 1 × 24 GiB and
    8 × 80 GiB): wall time and CPU time of ``make_plan`` (full table of 24 rows plus the largest
    micro-batch and segment search), and the number of traced steps;
(b) the accuracy table of ``tests/plan/test_accuracy.py``: the prediction for real CPU training steps
    at small sizes (both debug models, with and without checkpointing, 1 process and FSDP2 on 2 gloo
    processes) against MemTracker on real tensors and the process's peak-RSS rise.

    OMP_NUM_THREADS=1 python bench/plan.py [--out bench/results/plan.md] [--skip-accuracy]

A few minutes on 2 idle cores. Timings taken on a loaded machine are inflated; the load average is
printed next to them. CPU time is what the planner itself costs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "plan"))

from dist_audio.config import load_config  # noqa: E402
from dist_audio.plan import make_plan, parse_memory  # noqa: E402

QUESTIONS = [("configs/sashimi/seed-000.yaml", 1, "24GiB"), ("configs/tfswa/seed-003.yaml", 1, "24GiB"),
             ("configs/tfswa/seed-003.yaml", 8, "80GiB")]
GIB = 1024**3
MIB = 1024**2


def time_questions() -> list[str]:
    lines = ["| config | GPUs | recommended | peak GiB | max micro-batch | max segment s | traces | table wall s "
             "| total wall s | total CPU s |", "|---|---|---|---|---|---|---|---|---|---|"]
    wall_total = cpu_total = 0.0
    for config, gpus, memory in QUESTIONS:
        cfg = load_config(REPO / config)
        wall, cpu = time.perf_counter(), time.process_time()
        plan = make_plan(cfg, gpus=gpus, gpu_memory=parse_memory(memory), config_path=config)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        wall_total, cpu_total = wall_total + wall, cpu_total + cpu
        best = plan.recommended
        choice = f"{best.strategy}, ckpt {best.activation_checkpointing}, {best.precision}" if best else "none fits"
        lines.append(f"| {config} | {gpus} × {memory} | {choice} | {best.total / GIB if best else float('nan'):.2f} "
                     f"| {plan.max_micro_batch.value} | {plan.max_segment.value} | {plan.traces} "
                     f"| {plan.table_seconds:.1f} | {wall:.1f} | {cpu:.1f} |")
        print(lines[-1], flush=True)
    lines.append(f"| **total** | | | | | | | | {wall_total:.1f} | {cpu_total:.1f} |")
    return lines


def accuracy_table() -> list[str]:
    from test_accuracy import SINGLE, TWO_PROCESSES, accuracy_rows

    lines = ["| case | processes | checkpointing | rank | predicted MiB | MemTracker MiB | error "
             "| peak RSS MiB | error |", "|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for world, cases in ((1, SINGLE), (2, TWO_PROCESSES)):
            for r in accuracy_rows(cases, world, Path(tmp) / f"world{world}"):
                lines.append(f"| {r['case']} | {r['processes']} | {r['checkpointing']} | {r['rank']} "
                             f"| {r['predicted'] / MIB:.1f} | {r['tracker'] / MIB:.1f} | {r['tracker_error']:+.1%} "
                             f"| {r['rss'] / MIB:.1f} | {r['rss_error']:+.1%} |")
                print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "plan.md"))
    parser.add_argument("--skip-accuracy", action="store_true", help="only time the planner")
    args = parser.parse_args()
    load_before = os.getloadavg()
    report = ["# Memory planner", "",
              "Command: `OMP_NUM_THREADS=1 python bench/plan.py`  ",
              f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
              f"load average at start {load_before[0]:.1f}", "",
              "## Planner wall time (full 24-row table + max micro-batch / segment search)", ""]
    report += time_questions()
    report += ["", f"Load average after timing: {os.getloadavg()[0]:.1f}", ""]
    if not args.skip_accuracy:
        report += ["## Predicted vs measured peak (CPU, fp32, second training step)", ""]
        report += accuracy_table()
        report += ["", "Tolerance in `tests/plan/test_accuracy.py`: ±15 % against both measurements."]
    Path(args.out).write_text("\n".join(report) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
