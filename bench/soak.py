"""Soak test: 2-process DDP training SIGKILLed at random moments and restarted with ``--resume auto``
until it reaches its target step; then proves that no step was lost from the result or applied twice.

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu python bench/soak.py --minutes 30 --steps 1500 \
        --out bench/results/soak.md

For ``--minutes`` a random worker process (either rank) is SIGKILLed every 1 to 5 minutes (the interval
scales with ``--minutes / 30``), exactly like a node loss or the OOM killer; the launcher then stops the
other rank and the soak restarts the same command with ``--resume auto``. After ``--minutes`` the run is
left to finish. Checks at the end:

- the newest checkpoint is at ``--steps``; AdamW's own step counter in it equals ``--steps`` minus the
  skipped steps, and ``samples_seen`` equals ``--steps`` × batch size × processes: no optimizer update
  and no batch was applied twice or lost;
- the steps each attempt kept (up to the checkpoint the next attempt resumed from) tile 1..``--steps``
  exactly once;
- every step that was run again after a kill has the same loss as in the attempt that was killed
  (resume is exact, so the kills change nothing but the wall time).

Per-step losses come from ``tests/reliability/faulty_train.py`` (``DIST_AUDIO_STEP_LOG``), which is
``launch/train.py`` plus that record.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "tests/reliability/faulty_train.py"
STEPS_LINE = re.compile(r"steps: (\d+) -> (\d+)")
WRITTEN_LINE = re.compile(r"checkpoint \S+ written in ([\d.]+) s")


@dataclass
class Attempt:
    index: int
    start_step: int = -1  # the checkpoint it resumed from (0: fresh start)
    steps: dict[int, float] = field(default_factory=dict)  # step -> loss, as recorded by rank 0
    killed_rank: int | None = None  # None: it ran to the end
    killed_after_s: float = 0.0
    returncode: int | None = None
    checkpoint_seconds: list[float] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_processes(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The training processes under the launcher (one per rank), whatever their order."""
    try:
        children = psutil.Process(launcher.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in children if _safe_cmdline(p).count(str(TRAIN_SCRIPT)) == 1]


def _safe_cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def rank_of(process: psutil.Process) -> int:
    try:
        return int(process.environ().get("RANK", "-1"))
    except psutil.Error:
        return -1


def train_command(args: argparse.Namespace, run_dir: Path, first: bool) -> list[str]:
    overrides = {"data.shards": args.shards, "train.runs_dir": str(run_dir.parent), "train.name": run_dir.name,
                 "train.max_steps": args.steps, "train.checkpoint_every": args.checkpoint_every,
                 "train.keep_last": 2, "train.val_every": 10**9, "train.val_batches": 1,
                 "log.every": 10, "log.audio_seconds": 0.01, "log.progress_bar": "false",
                 "data.num_workers": 0}
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(args.processes),
            "--config_file", str(REPO / "configs/accelerate/ddp.yaml"), "--main_process_port", str(free_port()),
            str(TRAIN_SCRIPT), "--config", args.config,
            *[arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")],
            *(["--overwrite"] if first else ["--resume", "auto"])]


def run_attempt(args: argparse.Namespace, index: int, run_dir: Path, kill_at: float | None) -> Attempt:
    """One launch; SIGKILL a random rank ``kill_at`` seconds after the start (None: let it finish)."""
    attempt = Attempt(index)
    step_log = run_dir.parent / f"steps-{index:03d}.jsonl"
    log_file = run_dir.parent / f"attempt-{index:03d}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DIST_AUDIO_STEP_LOG": str(step_log),
           "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    with open(log_file, "w") as log:
        launcher = subprocess.Popen(train_command(args, run_dir, first=index == 0), cwd=REPO, env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            attempt.returncode = launcher.wait(timeout=kill_at)
        except subprocess.TimeoutExpired:
            workers = worker_processes(launcher)
            if workers:
                victim = random.choice(workers)
                attempt.killed_rank = rank_of(victim)
                victim.send_signal(signal.SIGKILL)
            else:  # no rank running (starting up or shutting down): kill the whole launch
                attempt.killed_rank = -1
                kill_tree(launcher)
            attempt.killed_after_s = time.monotonic() - started
            try:
                attempt.returncode = launcher.wait(timeout=120)
            except subprocess.TimeoutExpired:  # the launcher must tear the rest down; never leave strays
                kill_tree(launcher)
                attempt.returncode = launcher.wait()
        finally:
            kill_tree(launcher)
            launcher.wait()
    text = log_file.read_text(errors="replace")
    found = STEPS_LINE.search(text)
    attempt.start_step = int(found.group(1)) if found else -1
    attempt.checkpoint_seconds = [float(s) for s in WRITTEN_LINE.findall(text)]
    if step_log.exists():
        for line in step_log.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            attempt.steps[record["step"]] = record["loss"]
    return attempt


def kill_tree(launcher: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it; the ranks run in sessions of their own, so a
    process-group kill would miss them (a stray rank would hold the CPU and the port)."""
    try:
        processes = [psutil.Process(launcher.pid)]
        processes += processes[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def verify(args: argparse.Namespace, run_dir: Path, attempts: list[Attempt]) -> dict:
    """The end-of-soak checks; returns the figures for the report (raises AssertionError on failure)."""
    from dist_audio.train.checkpoint import STATE_DIR, latest_checkpoint
    from dist_audio.train.portable_state import read_full_state

    final = latest_checkpoint(run_dir)
    state = json.loads((final / "trainer_state.json").read_text())
    adam_steps = {int(read_full_state(final / STATE_DIR, "optim/")["step"])}
    batch = 4  # configs/sashimi/debug.yaml data.batch_size, grad_accum 1
    problems = []
    if state["step"] != args.steps:
        problems.append(f"final checkpoint at step {state['step']}, target {args.steps}")
    if adam_steps != {args.steps - state["skipped_steps"]}:
        problems.append(f"AdamW step counters {adam_steps}, expected {args.steps - state['skipped_steps']}")
    if state["samples_seen"] != args.steps * batch * args.processes:
        problems.append(f"samples_seen {state['samples_seen']}, expected {args.steps * batch * args.processes}")
    started = [a for a in attempts if a.start_step >= 0]
    kept: list[int] = []
    for attempt, following in zip(started, [*started[1:], None]):
        end = following.start_step if following else args.steps
        recorded = sorted(attempt.steps)
        if recorded and recorded != list(range(attempt.start_step + 1, recorded[-1] + 1)):
            problems.append(f"attempt {attempt.index} recorded steps {recorded[0]}..{recorded[-1]} with gaps")
        if end > (recorded[-1] if recorded else attempt.start_step):
            problems.append(f"attempt {attempt.index + 1} resumed from step {end}, beyond what attempt "
                            f"{attempt.index} ran")
        kept.extend(range(attempt.start_step + 1, end + 1))
    if sorted(kept) != list(range(1, args.steps + 1)):
        problems.append("the kept steps do not tile 1..target exactly once")
    reruns, mismatches = 0, []
    for later_index, later in enumerate(started):
        for earlier in started[:later_index]:
            for step in set(earlier.steps) & set(later.steps):
                reruns += 1
                if earlier.steps[step] != later.steps[step]:
                    mismatches.append((step, earlier.steps[step], later.steps[step]))
    if mismatches:
        problems.append(f"{len(mismatches)} re-run steps changed their loss, e.g. {mismatches[:3]}")
    assert not problems, "; ".join(problems)
    return {"final_step": state["step"], "adam_step": adam_steps.pop(), "skipped_steps": state["skipped_steps"],
            "samples_seen": state["samples_seen"], "reruns_compared": reruns}


def soak(args: argparse.Namespace) -> tuple[list[Attempt], dict, float]:
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("steps-*.jsonl"):
        stale.unlink()
    run_dir = root / "soak"
    rng = random.Random(args.seed)
    kill_min, kill_max = args.kill_every or (60 * args.minutes / 30, 300 * args.minutes / 30)
    started = time.monotonic()
    attempts: list[Attempt] = []
    while True:
        elapsed = time.monotonic() - started
        killing = elapsed < args.minutes * 60
        kill_at = rng.uniform(kill_min, kill_max) if killing else None
        attempt = run_attempt(args, len(attempts), run_dir, kill_at)
        attempts.append(attempt)
        print(f"attempt {attempt.index}: resumed at {attempt.start_step}, ran to "
              f"{max(attempt.steps, default=attempt.start_step)}, "
              + (f"SIGKILL rank {attempt.killed_rank} after {attempt.killed_after_s:.0f} s"
                 if attempt.killed_rank is not None else f"exit {attempt.returncode}"), flush=True)
        if attempt.killed_rank is None:
            if attempt.returncode != 0:
                raise SystemExit(f"attempt {attempt.index} failed without a kill (exit {attempt.returncode}); "
                                 f"see {root}/attempt-{attempt.index:03d}.log")
            break
    wall = time.monotonic() - started
    return attempts, verify(args, run_dir, attempts), wall


def report(args: argparse.Namespace, attempts: list[Attempt], figures: dict, wall: float, command: str) -> str:
    started = [a for a in attempts if a.start_step >= 0]
    rows = []
    for attempt in attempts:
        if attempt.killed_rank is None:
            continue
        following = next((a for a in started if a.index > attempt.index), None)
        ran_to = max(attempt.steps, default=max(attempt.start_step, 0))
        resumed = following.start_step if following else ran_to
        victim = "launcher (no rank running)" if attempt.killed_rank == -1 else f"rank {attempt.killed_rank}"
        rows.append(f"| {attempt.index} | {attempt.killed_after_s:.0f} | {victim} | {ran_to} | {resumed} | "
                    f"{ran_to - resumed} |")
    writes = [s for a in attempts for s in a.checkpoint_seconds]
    lost = [int(r.split("|")[6]) for r in rows]
    load = os.getloadavg()
    lines = [
        "# Soak: random SIGKILLs during 2-process DDP training",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()} CPU cores shared with other jobs; load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min). Model: configs/sashimi/debug.yaml on "
        f"{args.shards}, DDP (gloo) with {args.processes} processes, checkpoint every "
        f"{args.checkpoint_every} steps.",
        "",
        f"- wall time {wall / 60:.1f} min, kills sent during the first {min(args.minutes, wall / 60):.1f} min; "
        f"{len(attempts)} launches",
        f"- kills survived: **{len(rows)}** ({sum(a.killed_rank is not None and a.killed_rank >= 0 for a in attempts)}"
        " of a running rank); steps lost per kill (run again after the resume): "
        f"{', '.join(map(str, lost)) or '-'} (mean {sum(lost) / max(len(lost), 1):.1f}; at most "
        f"{args.checkpoint_every}, the steps since the newest complete checkpoint)",
        f"- checkpoint write time: median {_median(writes):.2f} s, max {max(writes, default=0):.2f} s "
        f"over {len(writes)} checkpoints",
        f"- final checkpoint at step {figures['final_step']} (target {args.steps}); AdamW step counter "
        f"{figures['adam_step']} (+ {figures['skipped_steps']} skipped steps); samples seen per rank "
        f"{figures['samples_seen']}",
        f"- steps run twice because of a kill and compared: {figures['reruns_compared']}, all with the "
        "identical loss; the kept steps tile 1..target exactly once: **no step lost, none applied twice**",
        "",
        CHECKS,
        "",
        "| launch | killed after s | victim | last step run | resumed from | steps lost |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    return "\n".join(lines)


CHECKS = ("How it is checked: rank 0 records every step's loss (`tests/reliability/faulty_train.py`); each "
          "launch's first step must follow the checkpoint it resumed from, the steps each launch kept (up to "
          "the checkpoint the next one resumed from) must tile 1..target exactly once, a step run again after "
          "a kill must repeat its loss exactly, and the final checkpoint's AdamW step counter and per-rank "
          "`samples_seen` must equal the target (counted by the optimizer and the trainer, not by the soak).")


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30, help="how long to keep killing (kills every "
                        "1-5 min scaled by minutes/30)")
    parser.add_argument("--kill-every", type=float, nargs=2, metavar=("MIN_S", "MAX_S"),
                        help="seconds between kills, drawn uniformly (default 60-300 scaled by minutes/30)")
    parser.add_argument("--steps", type=int, default=1500, help="target optimizer steps")
    parser.add_argument("--checkpoint-every", type=int, default=25, help="train.checkpoint_every")
    parser.add_argument("--processes", type=int, default=2, help="DDP processes")
    parser.add_argument("--config", default=str(REPO / "configs/sashimi/debug.yaml"), help="run config")
    parser.add_argument("--shards", default=str(REPO / "data/demo/shards/speech"), help="data.shards")
    parser.add_argument("--workdir", default="/tmp/dist_audio_soak", help="run directory and logs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--out", help="write the markdown report here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = "OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu python bench/soak.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    attempts, figures, wall = soak(args)
    text = report(args, attempts, figures, wall, command)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return {**figures, "kills": sum(a.killed_rank is not None for a in attempts)}


if __name__ == "__main__":
    main()
