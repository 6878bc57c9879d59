"""Resume on whatever comes back: a run stopped after step 6 continues on another number of processes or
under another strategy with exactly the reference run's data (``samples.jsonl``) and losses.

Every run is ``accelerate launch ... launch/train.py`` on CPU processes (gloo), the debug models on the
session's demo shards, a global batch of 6 samples (it splits over 1, 2 and 3 processes), a constant
learning rate, no validation. The reference trains 12 steps on 2 DDP processes; the others train 6
steps under one strategy, then ``--resume auto`` with ``train.max_steps=12`` under another. A kill -9 of
one rank in the middle of a ZeRO-3 or FSDP2 run is resumed in fresh processes and must repeat the
uninterrupted run of the same strategy bit for bit.

Each launch costs 20-40 s here: the fast tier runs two SaShiMi transitions from one DDP first half, the rest
is marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
DEBUG = {"sashimi": ROOT / "configs/sashimi/debug.yaml", "tfswa": ROOT / "configs/tfswa/debug.yaml"}
STEPS, STOP = 12, 6
TOLERANCE = 1e-4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(strategy: str, processes: int, config: Path, overrides: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / f"{strategy}.yaml"), "--num_processes", str(processes),
            "--main_process_port", str(free_port()), str(ROOT / "launch" / "train.py"), "--config", str(config),
            *[arg for item in overrides for arg in ("--set", item)], *extra]


def launch_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


class Run:
    """One run directory of a debug model, launched as often as a test needs."""

    def __init__(self, model: str, shards: Path, runs_dir: Path, name: str):
        self.model, self.shards, self.run_dir = model, shards, runs_dir / name
        self.overrides = [f"data.shards={shards}", f"train.runs_dir={runs_dir}", f"train.name={name}",
                          "data.batch_size=3", "train.grad_accum=1", "train.sample_log=true",
                          f"train.checkpoint_every={STOP}", "train.val_every=1000", "log.every=1",
                          "log.audio_seconds=0", "log.progress_bar=false", "optim.schedule=constant",
                          "train.keep_last=3"]

    def command(self, strategy: str, processes: int, steps: int, *extra: str) -> list[str]:
        return command(strategy, processes, DEBUG[self.model], [*self.overrides, f"train.max_steps={steps}"], *extra)

    def launch(self, strategy: str, processes: int, steps: int, *extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.command(strategy, processes, steps, *extra), cwd=ROOT, env=launch_env(),
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
        return proc

    def steps(self) -> dict[int, dict]:
        """step -> {"samples": [...], "loss": float} from samples.jsonl."""
        lines = (self.run_dir / "samples.jsonl").read_text().splitlines()
        return {entry["step"]: entry for entry in map(json.loads, lines)}

    def copy_as(self, name: str) -> Run:
        other = Run(self.model, self.shards, self.run_dir.parent, name)
        shutil.copytree(self.run_dir, other.run_dir)
        return other


@pytest.fixture(scope="module")
def runs(tmp_path_factory, speech_shards, musdb_shards):
    """Reference and first-half runs per model, made once per module on first use."""
    shards = {"sashimi": speech_shards, "tfswa": musdb_shards}
    root = tmp_path_factory.mktemp("elastic")
    cache: dict[tuple[str, str], Run] = {}

    def get(model: str, kind: str) -> Run:
        """``kind``: "reference" (12 steps, 2 DDP processes) or "<strategy>-half" (6 steps, 2 processes)."""
        if (model, kind) not in cache:
            run = Run(model, shards[model], root, f"{model}-{kind}")
            if kind == "reference":
                run.launch("ddp", 2, STEPS)
            else:
                run.launch(kind.removesuffix("-half"), 2, STOP)
            cache[model, kind] = run
        return cache[model, kind]

    return get


def assert_continues_the_reference(resumed: Run, reference: Run, *, exact: bool = False) -> None:
    expected, got = reference.steps(), resumed.steps()
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)
    for step in range(1, STEPS + 1):
        assert sorted(got[step]["samples"]) == sorted(expected[step]["samples"]), step
        if exact:
            assert got[step]["loss"] == expected[step]["loss"], step
        else:
            assert abs(got[step]["loss"] - expected[step]["loss"]) <= TOLERANCE * abs(expected[step]["loss"]), \
                (step, got[step]["loss"], expected[step]["loss"])


# (model, first half under, resumed under, processes after)
# the fast two share one first half (DDP), so CI pays for four launches; the rest is slow
TRANSITIONS = [("sashimi", "ddp", "fsdp", 2), ("sashimi", "ddp", "ddp", 3),
               *[pytest.param(*t, marks=pytest.mark.slow) for t in [
                   ("sashimi", "fsdp", "zero3_offload", 2), ("sashimi", "ddp", "single", 1),
                   ("sashimi", "zero2", "fsdp", 2), ("sashimi", "ddp", "zero3", 2),
                   ("tfswa", "ddp", "single", 1), ("tfswa", "zero2", "fsdp", 2), ("tfswa", "fsdp", "zero3_offload", 2),
                   ("tfswa", "ddp", "zero3", 2), ("tfswa", "ddp", "ddp", 3)]]]


@pytest.mark.parametrize(("model", "before", "after", "processes"), TRANSITIONS)
def test_resume_on_another_world_size_or_strategy_continues_the_reference(runs, model, before, after, processes):
    reference = runs(model, "reference")
    resumed = runs(model, f"{before}-half").copy_as(f"{model}-{before}-to-{after}-x{processes}")
    assert sorted(resumed.steps()) == list(range(1, STOP + 1))
    proc = resumed.launch(after, processes, STEPS, "--resume", "auto")
    assert "resumed with a changed config: train.max_steps: 6 -> 12" in proc.stderr
    assert "resumed under another strategy" in proc.stderr
    assert f"x {processes} processes = 6 samples per optimizer step" in proc.stderr
    assert_continues_the_reference(resumed, reference)


def worker_pids(launcher: subprocess.Popen) -> list[int]:
    """The training processes (children of torchrun's agent) of an ``accelerate launch``."""
    found = [p for p in psutil.Process(launcher.pid).children(recursive=True)
             if any("train.py" in part for part in p.cmdline()) and "accelerate.commands.launch" not in p.cmdline()]
    return [p.pid for p in found]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "strategy"), [("sashimi", "zero3"), ("tfswa", "fsdp")])
def test_kill_9_of_one_rank_resumes_in_fresh_processes_bit_for_bit(runs, tmp_path, model, strategy):
    base = runs(model, "reference")
    reference = Run(model, base.shards, tmp_path, "uninterrupted")
    reference.launch(strategy, 2, STEPS)  # the same strategy, uninterrupted: what "bit for bit" compares with

    killed = Run(model, base.shards, tmp_path, "killed")
    launcher = subprocess.Popen(killed.command(strategy, 2, STEPS), cwd=ROOT, env=launch_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not ((killed.run_dir / "samples.jsonl").is_file() and max(killed.steps(), default=0) >= STOP + 2):
            assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
            time.sleep(0.2)
        pids = worker_pids(launcher)
        assert len(pids) == 2, pids
        os.kill(pids[1], signal.SIGKILL)  # one rank dies mid-run, between checkpoints
        launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    killed.launch(strategy, 2, STEPS, "--resume", "auto")
    assert_continues_the_reference(killed, reference, exact=True)
