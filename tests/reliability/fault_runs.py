"""What the fault-injection tests share: training commands on the conftest shards, run as real
processes through ``faulty_train.py`` (``launch/train.py`` + fault injection + a per-step loss record).

A plain module (not ``conftest``), so tests import it by a name no other test directory uses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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

    def start(self, *extra: str, fault: str | None = None, processes: int = 1, strategy: str = "ddp",
              script: Path = FAULTY_TRAIN) -> subprocess.Popen:
        """Start ``script`` as a real process (its own session; output on ``stdout``); ``processes > 1``
        under ``accelerate launch`` with ``configs/accelerate/<strategy>.yaml`` (gloo on CPU)."""
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
               "DIST_AUDIO_STEP_LOG": str(self.step_log)}
        env.pop("DIST_AUDIO_FAULT", None)
        if fault:
            env["DIST_AUDIO_FAULT"] = fault
        prefix = [sys.executable]
        if processes > 1:
            prefix += ["-m", "accelerate.commands.launch", "--num_processes", str(processes), "--config_file",
                       str(REPO / f"configs/accelerate/{strategy}.yaml"), "--main_process_port", str(free_port())]
        return subprocess.Popen([*prefix, str(script), *self.args(*extra)], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    def launch(self, *extra: str, fault: str | None = None, processes: int = 1, strategy: str = "ddp",
               script: Path = FAULTY_TRAIN, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run to the end (or to the injected fault); ``stdout`` holds stdout and stderr together."""
        child = self.start(*extra, fault=fault, processes=processes, strategy=strategy, script=script)
        try:
            output, _ = child.communicate(timeout=timeout)
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        return subprocess.CompletedProcess(child.args, child.returncode, output)

    def exit_codes(self) -> dict[int, int]:
        """rank -> what ``launch/train.py``'s ``main`` returned there, in the latest launch that ended."""
        path = Path(f"{self.step_log}.exits")
        return {r["rank"]: r["exit"] for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}

    def losses(self) -> list[tuple[int, float]]:
        """Every ``(step, loss)`` rank 0 recorded, across all launches, in order."""
        if not self.step_log.exists():
            return []
        lines = self.step_log.read_text().split("\n")[:-1]  # a last line without "\n" is still being written
        return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def rank_pids(launcher: int) -> list[int]:
    """The training ranks started (at any depth) under process ``launcher``: those with ``LOCAL_RANK``
    in their environment, found through ``/proc`` (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # "pid (name) state ppid ..."
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [launcher]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            try:
                if b"\0LOCAL_RANK=" in b"\0" + Path(f"/proc/{child}/environ").read_bytes():
                    found.append(child)
            except OSError:
                continue
    return sorted(found)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

