"""Fixtures for the fault-injection tests: training commands on the conftest shards, run as real
processes through ``faulty_train.py`` (``launch/train.py`` + fault injection + a per-step loss record)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAULTY_TRAIN = Path(__file__).with_name("faulty_train.py")
SASHIMI_DEBUG = REPO / "configs/sashimi/debug.yaml"
# a few tiny steps; every loss logged; no validation or preview worth the time
QUICK = ["data.batch_size=2", "data.num_workers=0", "train.val_batches=1", "train.val_every=1000",
         "log.every=1", "log.audio_seconds=0.01", "log.progress_bar=false", "optim.warmup_steps=3"]


@dataclass
class Run:
    """One training run directory and how to start it."""

    config: Path
    overrides: list[str]
    run_dir: Path
    step_log: Path

    def args(self, *extra: str) -> list[str]:
        return ["--config", str(self.config), *[a for item in self.overrides for a in ("--set", item)], *extra]

    def start(self, *extra: str, fault: str | None = None, processes: int = 1) -> subprocess.Popen:
        """Start training as a real process (its own session; output on ``stdout``); ``processes > 1``
        under ``accelerate launch`` with the DDP config (gloo on CPU)."""
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
               "DIST_AUDIO_STEP_LOG": str(self.step_log)}
        env.pop("DIST_AUDIO_FAULT", None)
        if fault:
            env["DIST_AUDIO_FAULT"] = fault
        prefix = [sys.executable]
        if processes > 1:
            prefix += ["-m", "accelerate.commands.launch", "--num_processes", str(processes), "--config_file",
                       str(REPO / "configs/accelerate/ddp.yaml"), "--main_process_port", str(free_port())]
        return subprocess.Popen([*prefix, str(FAULTY_TRAIN), *self.args(*extra)], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    def launch(self, *extra: str, fault: str | None = None, processes: int = 1,
               timeout: float = 300) -> subprocess.CompletedProcess:
        """Run to the end (or to the injected fault); ``stdout`` holds stdout and stderr together."""
        child = self.start(*extra, fault=fault, processes=processes)
        try:
            output, _ = child.communicate(timeout=timeout)
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        return subprocess.CompletedProcess(child.args, child.returncode, output)

    def losses(self) -> list[tuple[int, float]]:
        """Every ``(step, loss)`` rank 0 recorded, across all launches, in order."""
        if not self.step_log.exists():
            return []
        lines = self.step_log.read_text().split("\n")[:-1]  # a last line without "\n" is still being written
        return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def make_run(tmp_path, speech_shards):
    """``make_run(name, *overrides, shards=...) -> Run``: the debug SaShiMi under ``tmp_path/runs``."""

    def make(name: str, *overrides: str, shards: Path = speech_shards) -> Run:
        items = [f"data.shards={shards}", f"train.runs_dir={tmp_path / 'runs'}", f"train.name={name}",
                 *QUICK, *overrides]
        return Run(SASHIMI_DEBUG, items, tmp_path / "runs" / name, tmp_path / f"{name}.steps.jsonl")

    return make
