"""Memory planner: wall time per question, and predicted vs measured peak memory.

(a) the planner answering the seed questions (seed-000 on 1 × 24 GiB; seed-003 on 1 × 24 GiB and
    8 × 80 GiB) as a user asks them: ``launch/plan.py ... --json`` in a fresh process, wall time from
    start to exit (imports included) and CPU time of the process and its tracing workers; cold (an
    empty trace cache) and warm (asked again: traces from the cache); the number of traced steps;
(b) the predictions compared with ``bench/results/plan_before/`` (the planner before the speed-up):
    every difference listed, split into deliberate (the DeepSpeed / FSDP2 bf16 rows, now traced with
    bf16 parameters) and unexpected (must be none);
(c) the accuracy table of ``tests/plan/test_accuracy.py``: the prediction for real CPU training steps
    at small sizes (both debug models, with and without checkpointing, 1 process; FSDP2 on 2 gloo
    processes in fp32 and with bf16 parameters) against MemTracker on real tensors and the process's
    peak-RSS rise;
(d) with ``--against DIR`` (another checkout, e.g. ``git worktree add /tmp/before <commit>``): the cold
    questions asked alternately of this tree and DIR, ``--rounds`` times each, min and median wall per
    tree, and whether the two trees' answers are identical (the figures a speed-up is claimed with).

    OMP_NUM_THREADS=1 python bench/plan.py [--out bench/results/plan.md] [--skip-accuracy]
                                           [--against DIR [--rounds 3]]

A few minutes on 2 idle cores. Timings taken on a loaded machine are inflated; the load average is
printed next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "plan"))

from _compare import compare_plans  # noqa: E402

# (config, GPUs, memory, file name in bench/results/plan_before/)
QUESTIONS = [("configs/sashimi/seed-000.yaml", 1, "24GiB", "seed000_1x24"),
             ("configs/tfswa/seed-003.yaml", 1, "24GiB", "seed003_1x24"),
             ("configs/tfswa/seed-003.yaml", 8, "80GiB", "seed003_8x80")]
BEFORE = REPO / "bench" / "results" / "plan_before"
MIB = 1024**2


def ask(config: str, gpus: int, memory: str, cache: Path, tree: Path = REPO) -> tuple[dict, float, float]:
    """One question through the command line of ``tree`` in a fresh process: (plan JSON, wall s, CPU s
    incl. workers)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "DIST_AUDIO_PLAN_CACHE": str(cache)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    out = subprocess.run([sys.executable, str(tree / "launch" / "plan.py"), "--config", config, "--gpus", str(gpus),
                          "--gpu-memory", memory, "--json"], cwd=tree, env=env, capture_output=True, text=True,
                         check=True)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(out.stdout), wall, cpu


def time_questions() -> tuple[list[str], list[str]]:
    """The timing table and the comparison with the saved predictions."""
    lines = ["| config | GPUs | recommended | peak GiB | max micro-batch | max segment s | traces "
             "| cold wall s | cold CPU s | warm wall s | warm CPU s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    comparison = []
    for config, gpus, memory, name in QUESTIONS:
        with tempfile.TemporaryDirectory() as cache:  # every question starts from an empty cache
            plan, cold_wall, cold_cpu = ask(config, gpus, memory, Path(cache))
            warm, warm_wall, warm_cpu = ask(config, gpus, memory, Path(cache))
            best = plan["recommended"]
            choice = (f"{best['strategy']}, ckpt {best['activation_checkpointing']}, {best['precision']}"
                      if best else "none fits")
            lines.append(f"| {config} | {gpus} × {memory} | {choice} | {best['per_gpu_gib']['total'] if best else '-'} "
                         f"| {plan['max_micro_batch']} | {plan['max_segment_seconds']} | {plan['traces']} "
                         f"| {cold_wall:.1f} | {cold_cpu:.1f} | {warm_wall:.1f} | {warm_cpu:.1f} |")
            print(lines[-1], flush=True)
            before = json.loads((BEFORE / f"{name}.json").read_text())
            deliberate, unexpected = compare_plans(before, plan)
            warm_differs = any(compare_plans(plan, warm))
            changed_rows = sorted({int(path[6:path.index("]")]) for path, _, _ in deliberate
                                   if path.startswith(".rows[")})
            comparison.append(f"- `{config}` on {gpus} × {memory}: {len(unexpected)} unexpected differences"
                              f"{': ' + '; '.join(f'{p} {a} -> {b}' for p, a, b in unexpected) if unexpected else ''}"
                              f"; warm answer {'differs' if warm_differs else 'identical to cold'}; "
                              f"{len(changed_rows)} rows changed deliberately (bf16 traced with bf16 parameters), "
                              "total GiB per GPU before → after:")
            for i in changed_rows:
                old, new = before["rows"][i], plan["rows"][i]
                comparison.append(f"  - {old['strategy']}, ckpt {old['activation_checkpointing']}, bf16: "
                                  f"{old['per_gpu_gib']['total']} → {new['per_gpu_gib']['total']} (activations "
                                  f"{old['per_gpu_gib']['activations']} → {new['per_gpu_gib']['activations']})")
    return lines, comparison


def side_by_side(other: Path, rounds: int) -> list[str]:
    """Cold questions asked alternately of this tree and ``other`` (the order flips every round)."""
    from _compare import TIMING

    lines = [f"| config | GPUs | this tree: min / median s | `{other}`: min / median s | answers identical |",
             "|---|---|---|---|---|"]
    for config, gpus, memory, _ in QUESTIONS:
        walls: dict[Path, list[float]] = {REPO: [], other: []}
        answers = set()
        for round_ in range(rounds):
            for tree in (REPO, other) if round_ % 2 == 0 else (other, REPO):
                with tempfile.TemporaryDirectory() as cache:
                    plan, wall, _ = ask(config, gpus, memory, Path(cache), tree)
                walls[tree].append(wall)
                answers.add(json.dumps({k: v for k, v in plan.items() if k not in TIMING}, sort_keys=True))
        mine, theirs = walls[REPO], walls[other]
        identical = "yes" if len(answers) == 1 else "NO"
        lines.append(f"| {config} | {gpus} × {memory} | {min(mine):.1f} / {statistics.median(mine):.1f} "
                     f"| {min(theirs):.1f} / {statistics.median(theirs):.1f} | {identical} |")
        print(lines[-1], flush=True)
    return lines


def accuracy_table() -> list[str]:
    from test_accuracy import SINGLE, TWO_PROCESSES, TWO_PROCESSES_BF16, accuracy_rows

    lines = ["| case | processes | checkpointing | precision | rank | predicted MiB | MemTracker MiB | error "
             "| peak RSS MiB | error |", "|---|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        runs = (("one", 1, SINGLE), ("fsdp", 2, TWO_PROCESSES), ("fsdp-bf16", 2, TWO_PROCESSES_BF16))
        for label, world, cases in runs:
            for r in accuracy_rows(cases, world, Path(tmp) / label):
                lines.append(f"| {r['case']} | {r['processes']} | {r['checkpointing']} | {r['precision']} "
                             f"| {r['rank']} "
                             f"| {r['predicted'] / MIB:.1f} | {r['tracker'] / MIB:.1f} | {r['tracker_error']:+.1%} "
                             f"| {r['rss'] / MIB:.1f} | {r['rss_error']:+.1%} |")
                print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "plan.md"))
    parser.add_argument("--skip-accuracy", action="store_true", help="only time the planner")
    parser.add_argument("--against", type=Path, help="another checkout to time the cold questions against")
    parser.add_argument("--rounds", type=int, default=3, help="questions per tree with --against (default 3)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    report = ["# Memory planner", "",
              "Command: `OMP_NUM_THREADS=1 python bench/plan.py`  ",
              f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
              f"load average at start {load_before[0]:.1f}", "",
              "## Planner wall time per question (`launch/plan.py --json`, fresh process, 24 rows + search)", ""]
    timing, comparison = time_questions()
    report += timing
    report += ["", f"Load average after timing: {os.getloadavg()[0]:.1f}. Cold: an empty trace cache; warm: the "
               "same question asked again (its traces read from the cache). CPU s: the process and its tracing "
               "workers.", "",
               "## Predictions against `bench/results/plan_before/` (the planner before this change)", ""]
    report += comparison
    report += [""]
    if args.against:
        report += [f"## Cold questions side by side with `{args.against}` ({args.rounds} rounds, alternating)", ""]
        report += side_by_side(args.against.resolve(), args.rounds)
        report += [""]
    if not args.skip_accuracy:
        report += ["## Predicted vs measured peak (CPU, second training step)", ""]
        report += accuracy_table()
        report += ["", "Tolerance in `tests/plan/test_accuracy.py`: ±15 % against both measurements."]
    Path(args.out).write_text("\n".join(report) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
