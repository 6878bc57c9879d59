"""Preemption end to end, on real processes: SIGINT (Ctrl-C) or SIGTERM (Slurm, Kubernetes) lets the
current step finish, writes a checkpoint at that step and exits 0 with the resume command; nothing is lost.
The same signal twice within the repeat window (a rank signalled directly and by its launcher) counts once.

Also covered in ``tests/train/test_train_cli.py``: SIGTERM in-process (exit 0, message) and a second
signal after the window killing the process at once without a checkpoint; ``test_slurm.py``: the same
through ``launch/slurm.sbatch``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

from fault_runs import rank_pids
from faulty_train import install

from dist_audio.train.checkpoint import complete_checkpoints
from launch import train as launch_train


def wait_for_steps(run, child: subprocess.Popen, count: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while len(run.losses()) < count:
        assert child.poll() is None, child.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)


def test_sigint_finishes_the_step_checkpoints_and_exits_0(make_run, monkeypatch):
    run = make_run("ctrl-c", "train.max_steps=1000", "train.checkpoint_every=1000")
    child = run.start()
    try:
        wait_for_steps(run, child, 2)
        child.send_signal(signal.SIGINT)
        output, _ = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, output[-3000:]
    last = run.losses()[-1][0]  # the step in flight when the signal came was finished and recorded
    assert [p.name for p in complete_checkpoints(run.run_dir)] == [f"step-{last}"]
    assert f"stopped by SIGINT after step {last}" in output and "--resume auto" in output
    assert "Traceback" not in output

    run.step_log.unlink()
    install(None, run.step_log, setattr=monkeypatch.setattr)
    assert launch_train.main(run.args("--set", f"train.max_steps={last + 2}", "--resume", "auto")) == 0
    assert [step for step, _ in run.losses()] == [last + 1, last + 2]  # no step lost or repeated


def test_sigterm_twice_within_2_s_counts_once(make_run):
    run = make_run("twice", "train.max_steps=1000", "train.checkpoint_every=1000")
    child = run.start()
    try:
        wait_for_steps(run, child, 2)
        child.send_signal(signal.SIGTERM)
        time.sleep(0.1)  # the repeat lands while the step and the checkpoint are still running
        child.send_signal(signal.SIGTERM)  # the same preemption, delivered again
        output, _ = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, output[-3000:]
    last = run.losses()[-1][0]
    assert [p.name for p in complete_checkpoints(run.run_dir)] == [f"step-{last}"]
    assert re.search(rf"stopped by SIGTERM after step {last}; checkpoint \S+ written, [\d.]+ s after the signal",
                     output), output[-3000:]
    assert "Traceback" not in output


def test_sigterm_to_launcher_and_ranks_checkpoints_every_rank(make_run):
    """What Slurm's scancel does: SIGTERM to every process of the step, so each rank gets it directly
    and again from ``accelerate launch`` (torchrun) forwarding it; both finish the step, write one
    checkpoint and return 0. The launcher itself then exits non-zero with torch's SignalException (not
    ours to change; ``launch/slurm.sbatch`` signals only the ranks, see test_slurm.py)."""
    run = make_run("preempted", "train.max_steps=1000", "train.checkpoint_every=1000")
    child = run.start(processes=2)
    try:
        wait_for_steps(run, child, 2)
        ranks = rank_pids(child.pid)
        assert len(ranks) == 2
        for pid in ranks:
            os.kill(pid, signal.SIGTERM)
        child.send_signal(signal.SIGTERM)  # the launcher forwards it to both ranks again
        output, _ = child.communicate(timeout=180)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    last = run.losses()[-1][0]
    assert [p.name for p in complete_checkpoints(run.run_dir)] == [f"step-{last}"], output[-3000:]
    assert output.count(f"stopped by SIGTERM after step {last}") == 2  # one line per rank
    assert run.exit_codes() == {0: 0, 1: 0}
    state = json.loads((run.run_dir / "checkpoints" / f"step-{last}" / "trainer_state.json").read_text())
    assert state["step"] == last and state["samples_seen"] == 2 * 2 * last
