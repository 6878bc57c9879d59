"""``make demo``: the whole flow on the demo shards, on CPU: plan, train sharded, listen, look.

1. asks ``launch/plan.py`` what fits each debug model (TF-SWA on 2 × 24 GiB, SaShiMi on 1 × 24 GiB) and
   prints the answer;
2. trains both side by side with ``accelerate launch``: TF-SWA on 2 processes under FSDP2
   (``configs/accelerate/fsdp.yaml``: parameters, gradients and optimizer state sharded), SaShiMi with
   the launch line the planner printed; one live line per run (step, loss, samples/s, ETA) read from each
   run's ``progress.json``;
3. generates speech with SaShiMi (``launch/generate.py``) and separates a demo test mixture with TF-SWA
   (``launch/separate.py``);
4. copies each run's last TensorBoard spectrogram figure to ``<out>/figures/`` and prints where
   everything is and the command that opens TensorBoard.

Expects ``make demo-data`` to have written ``<data>/shards/{speech,musdb}`` and ``<data>/audio/musdb``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]  # `accelerate launch` of this interpreter
SHARDED = "fsdp"  # the strategy TF-SWA trains under: configs/accelerate/fsdp.yaml, FSDP2 on 2 processes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "data/demo", help="demo data root (make demo-data)")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs", help="where the two runs are written")
    parser.add_argument("--out", type=Path, default=REPO / "out/demo",
                        help="where the planner's answers, the audio and the figures are written")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per model")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each generated SaShiMi clip")
    return parser.parse_args(argv)


def shown(path: Path | str) -> str:
    """``path`` relative to the working directory when it lies under it (shorter to read and to paste)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def command_line(command: list[str]) -> str:
    """A command as a user would type it: ``python``/``accelerate launch`` instead of interpreter paths."""
    if command[:3] == ACCELERATE:
        command = ["accelerate", "launch", *command[3:]]
    elif command[0] == sys.executable:
        command = ["python", *command[1:]]
    return shlex.join(shown(part) if Path(part).is_absolute() else part for part in command)


# --------------------------------------------------------------------------------------------------
# 1. the planner
# --------------------------------------------------------------------------------------------------


def ask_planner(args: argparse.Namespace) -> dict[str, dict]:
    """One question per model, one after the other (the planner traces on every core); the JSON answers
    by model."""
    args.out.mkdir(parents=True, exist_ok=True)
    answers = {}
    for model, gpus in (("tfswa", 2), ("sashimi", 1)):
        command = [sys.executable, "launch/plan.py", "--config", f"configs/{model}/debug.yaml", "--gpus", str(gpus),
                   "--gpu-memory", "24GiB"]
        answer_file = args.out / f"plan-{model}.json"
        print(f"  $ {command_line(command)}")
        with answer_file.open("w") as answer:
            done = subprocess.run([*command, "--json"], cwd=REPO, stdout=answer, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            sys.exit(f"launch/plan.py failed (exit {done.returncode}):\n{done.stderr}")
        answers[model] = plan = json.loads(answer_file.read_text())
        for line in describe_plan(plan, sharded=model == "tfswa"):
            print(f"    {line}")
    return answers


def describe_plan(plan: dict, *, sharded: bool) -> list[str]:
    """The planner's answer in a few lines (``launch/plan.py`` without ``--json`` prints the whole table)."""
    inputs, rows = plan["inputs"], plan["rows"]

    def row_text(row: dict) -> str:
        return (f"{row['strategy']}, checkpointing {row['activation_checkpointing']}, {row['precision']}: "
                f"{row['per_gpu_gib']['total']:.2f} GiB per GPU")

    lines = [f"{inputs['model']}, {inputs['parameters']:,} parameters, micro-batch {inputs['micro_batch']} × "
             f"{inputs['segment_seconds']:g} s on {inputs['gpus']} × {inputs['gpu_memory_gib']:g} GiB: "
             f"{sum(r['fits'] for r in rows)} of {len(rows)} strategy rows fit"]
    if plan["recommended"]:
        lines.append(f"recommended: {row_text(plan['recommended'])}; largest micro-batch "
                     f"{plan['max_micro_batch']}, longest segment {plan['max_segment_seconds']:g} s")
    if sharded:
        row = next(r for r in rows if r["strategy"] == SHARDED and r["activation_checkpointing"] == "none"
                   and r["precision"] == "fp32")
        lines.append(f"{row_text(row)} <- what the demo trains on 2 CPU processes, to show sharding")
    else:
        lines.append(f"launch: {plan['launch']}")
        lines.append("<- the demo launches SaShiMi with this line (plus its data, name and step count)")
    return lines


# --------------------------------------------------------------------------------------------------
# 2. training, with one progress line per run
# --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    model: str
    strategy: str
    command: list[str]
    run_dir: Path
    log_path: Path
    process: subprocess.Popen | None = None
    log: IO | None = None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    def status(self) -> tuple[str, str]:
        """The run's progress line, and its milestone: state and tenth of the run reached."""
        head = f"{self.model:<8} {self.strategy:<26}"
        if self.process.poll() is not None and self.process.returncode != 0:
            return f"{head} FAILED (exit {self.process.returncode}), log {shown(self.log_path)}", "failed"
        try:
            progress = json.loads((self.run_dir / "progress.json").read_text())
        except (OSError, ValueError):  # not written yet (or the run directory is being recreated)
            return f"{head} starting ({time.monotonic() - self.started:.0f} s)", "starting"
        loss = "nan" if progress["loss"] is None else f"{progress['loss']:.4f}"
        done = self.finished is not None
        tail = f"done in {self.finished - self.started:.0f} s" if done else f"ETA {_minutes(progress['eta_s'])}"
        line = (f"{head} step {progress['step']:>4}/{progress['max_steps']}  loss {loss}  "
                f"{progress['samples_per_s']:6.1f} samples/s  {tail}")
        return line, f"{10 * progress['step'] // progress['max_steps']} {done}"


def _minutes(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def free_port() -> int:
    """A port no one listens on now: the rendezvous of the 2-process run must not meet another job's."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def training_runs(args: argparse.Namespace, plans: dict[str, dict]) -> list[Run]:
    """TF-SWA under FSDP2 on 2 processes; SaShiMi as the planner says to launch it."""
    every = args.steps // 3 if args.steps >= 6 else args.steps  # three validations, checkpoints alongside
    shards = {"sashimi": args.data / "shards/speech", "tfswa": args.data / "shards/musdb"}
    runs = []
    for model in ("tfswa", "sashimi"):
        name = f"demo-{model}"
        overrides = [f"data.shards={shards[model].resolve()}", f"train.runs_dir={args.runs_dir.resolve()}",
                     f"train.name={name}", f"train.max_steps={args.steps}", f"train.val_every={every}",
                     f"train.checkpoint_every={every}", "log.progress_bar=false"]
        if model == "tfswa":
            launch = [*ACCELERATE, "--config_file", f"configs/accelerate/{SHARDED}.yaml", "--num_processes", "2",
                      "--main_process_port", str(free_port()),
                      "launch/train.py", "--config", "configs/tfswa/debug.yaml"]
            strategy = f"{SHARDED} (FSDP2), 2 processes"
        else:
            planned = shlex.split(plans[model]["launch"])
            if planned[:2] != ["accelerate", "launch"]:
                sys.exit(f"unexpected launch line from the planner: {plans[model]['launch']}")
            launch = [*ACCELERATE, *planned[2:]]
            strategy = f"{Path(plans[model]['accelerate_config']).stem}, 1 process"
            overrides.append("log.audio_seconds=0.25")  # a generated clip as long as the real one beside it
        command = [*launch, *(part for item in overrides for part in ("--set", item)), "--overwrite"]
        runs.append(Run(model, strategy, command, args.runs_dir / name, args.runs_dir / f"{name}.log"))
    return runs


def train_both(runs: list[Run]) -> None:
    """Start every run, show their progress until all are done; exit with the log's tail if one fails."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    for run in runs:
        run.run_dir.parent.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "progress.json").unlink(missing_ok=True)  # a previous demo's
        print(f"  $ {command_line(run.command)}")
        run.log = run.log_path.open("w")
        run.started = time.monotonic()
        run.process = subprocess.Popen(run.command, cwd=REPO, stdout=run.log, stderr=subprocess.STDOUT,
                                       env=environment)
    print(f"  (each run's full log: {', '.join(shown(r.log_path) for r in runs)})")
    display = ProgressDisplay(live=sys.stdout.isatty())
    try:
        while True:
            for run in runs:
                if run.finished is None and run.process.poll() is not None:
                    run.finished = time.monotonic()
            display.show([run.status() for run in runs], final=all(r.finished for r in runs))
            failed = next((r for r in runs if r.finished and r.process.returncode != 0), None)
            if failed or all(r.finished for r in runs):
                break
            time.sleep(1.0)
    finally:
        for run in runs:
            if run.process.poll() is None:
                run.process.terminate()  # our own child, on an error or Ctrl-C
                run.process.wait()
            run.log.close()
    if failed:
        tail = failed.log_path.read_text().splitlines()[-25:]
        sys.exit(f"training {failed.model} failed (exit {failed.process.returncode}); last lines of "
                 f"{shown(failed.log_path)}:\n" + "\n".join(tail))


class ProgressDisplay:
    """One line per run, redrawn in place on a terminal; elsewhere (a log, a test) printed again whenever a
    run reaches a milestone (another tenth of its steps, a change of state), or after 30 s."""

    def __init__(self, live: bool):
        self.live = live
        self.drawn = 0
        self.milestones: list[str] = []
        self.printed_at = 0.0

    def show(self, statuses: list[tuple[str, str]], *, final: bool) -> None:
        lines = [line for line, _ in statuses]
        if self.live:
            up = f"\x1b[{self.drawn}F" if self.drawn else ""
            sys.stdout.write(up + "".join(f"  {line}\x1b[K\n" for line in lines))
            sys.stdout.flush()
            self.drawn = len(lines)
            return
        milestones = [milestone for _, milestone in statuses]
        if final or milestones != self.milestones or time.monotonic() - self.printed_at > 30:
            print("\n".join(f"  {line}" for line in lines), flush=True)
            self.milestones, self.printed_at = milestones, time.monotonic()


# --------------------------------------------------------------------------------------------------
# 3. listen, 4. look
# --------------------------------------------------------------------------------------------------


def listen(args: argparse.Namespace, runs: dict[str, Run]) -> tuple[Path, Path, Path]:
    """Generation and separation side by side (one core each); each prints its last line."""
    generated, separated = args.out / "generated", args.out / "separated"
    mixture = sorted((args.data / "audio/musdb/test").glob("*/mixture.wav"))[0]
    jobs = {"generate": [sys.executable, "launch/generate.py", "--checkpoint", str(runs["sashimi"].run_dir.resolve()),
                         "--num", "2", "--seconds", f"{args.seconds:g}", "--out", str(generated.resolve())],
            "separate": [sys.executable, "launch/separate.py", "--checkpoint", str(runs["tfswa"].run_dir.resolve()),
                         "--input", str(mixture.resolve()), "--out", str(separated.resolve())]}
    started = {}
    for name, command in jobs.items():
        print(f"  $ {command_line(command)}")
        started[name] = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for name, process in started.items():
        output, _ = process.communicate()
        if process.returncode != 0:
            sys.exit(f"{name} failed (exit {process.returncode}):\n{output}")
        print(f"    {output.strip().splitlines()[-1]}")
    return generated, separated, mixture


def save_figures(runs: dict[str, Run], out: Path) -> dict[str, Path]:
    """The last ``spectrogram/0`` figure of each run's TensorBoard events, as ``<out>/<model>.png``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for model, run in runs.items():
        events = EventAccumulator(str(run.run_dir / "tb"), size_guidance={"images": 1, "scalars": 1,
                                                                         "audio": 1, "tensors": 1})
        events.Reload()
        if "spectrogram/0" in events.Tags()["images"]:
            written[model] = out / f"{model}.png"
            written[model].write_bytes(events.Images("spectrogram/0")[-1].encoded_image_string)
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for needed in ("shards/speech/manifest.json", "shards/musdb/manifest.json", "audio/musdb/test"):
        if not (args.data / needed).exists():
            sys.exit(f"no {args.data / needed}: run `make demo-data` first")
    clock = [time.monotonic()]

    def lap() -> str:
        clock.append(time.monotonic())
        return f"({clock[-1] - clock[-2]:.0f} s)"

    print("[1/4] What fits? launch/plan.py traces one training step of each model on fake tensors (no GPU needed)")
    plans = ask_planner(args)
    print(f"  {lap()}\n\n[2/4] Training both models side by side, {args.steps} steps each")
    runs = training_runs(args, plans)
    train_both(runs)
    by_model = {run.model: run for run in runs}
    print(f"  {lap()}\n\n[3/4] Listening: SaShiMi generates speech, TF-SWA separates a test mixture")
    generated, separated, mixture = listen(args, by_model)
    print(f"  {lap()}\n\n[4/4] Figures: the last validation's TensorBoard spectrograms as PNG files")
    figures = save_figures(by_model, args.out / "figures")
    for model, path in figures.items():
        print(f"  {shown(path)}: " + ("per stem the target beside the estimate, its SDR in the title"
                                     if model == "tfswa" else "a real clip beside a generated one"))
    tensorboard = Path(sys.executable).with_name("tensorboard")
    print(f"  {lap()}\n\nDone in {_minutes(clock[-1] - clock[0])} (min:s). Where everything is:")
    print(f"  planner answers:   {', '.join(shown(args.out / f'plan-{m}.json') for m in plans)}"
          "  (rerun the commands above without --json for the whole table)")
    for run in runs:
        print(f"  run {run.model + ':':<13} {shown(run.run_dir)}/  ({run.strategy}; config.yaml, checkpoints/, tb/, "
              f"progress.json; log {shown(run.log_path)})")
    print(f"  figures:           {', '.join(shown(p) for p in figures.values())}  (TensorBoard: IMAGES tab)")
    print(f"  generated speech:  {shown(generated)}/  (SaShiMi, 2 clips of {args.seconds:g} s)")
    print(f"  separated stems:   {shown(separated)}/  (TF-SWA on {shown(mixture)})")
    print(f"  open TensorBoard:  {shown(tensorboard) if tensorboard.exists() else 'tensorboard'} "
          f"--logdir {shown(args.runs_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
