"""A really full disk: the run directory on an 8 MB tmpfs, filled by the test, under one process, two DDP
processes and two FSDP2 processes. Nothing in the training code is patched; the filesystem itself
refuses the writes (``OSError`` ENOSPC from Python, ``RuntimeError`` from ``torch.save``, DCP's
``CheckpointException``).

What must hold: every rank stops within 60 s of the failed checkpoint with exit 1 and one line naming the
checkpoint and the cause, no traceback, no ``.tmp-step-*`` left, the earlier checkpoint intact; once
space is freed, ``--resume auto`` continues from it with the same losses.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest

from dist_audio.train.checkpoint import complete_checkpoints

CHECKPOINT_BYTES_FREE = 200_000  # a debug-SaShiMi checkpoint needs about 1 MB; config and events fit


def assert_no_traceback_but_the_launchers(output: str, processes: int) -> None:
    """No rank printed a traceback; with several processes ``accelerate launch`` prints its own report
    of the failed workers (``ChildFailedError``), which is not ours to change."""
    expected = 1 if processes > 1 else 0
    assert output.count("Traceback (most recent call last)") == expected, output[-4000:]
    assert processes == 1 or "ChildFailedError" in output


def wait_for_step(run, child, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not any(s == step for s, _ in run.losses()):
        assert child.poll() is None, child.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"step {step} not reached"
        time.sleep(0.05)


@pytest.mark.parametrize(("processes", "strategy"), [(1, "ddp"), (2, "ddp"), (2, "fsdp")],
                         ids=["one-process", "ddp-2", "fsdp2-2"])
def test_checkpoint_into_a_full_disk_exits_1_on_every_rank_and_resumes(make_run, small_disk, processes, strategy):
    run = make_run("full", "train.checkpoint_every=2", "train.keep_last=3", runs_dir=small_disk.path)
    first = run.launch("--set", "train.max_steps=2", processes=processes, strategy=strategy)
    assert first.returncode == 0, first.stdout[-3000:]
    assert [p.name for p in complete_checkpoints(run.run_dir)] == ["step-2"]
    before = dict(run.losses())

    filler = small_disk.fill(leave=CHECKPOINT_BYTES_FREE)
    Path(f"{run.step_log}.exits").unlink()
    child = run.start("--set", "train.max_steps=6", "--resume", "auto", processes=processes, strategy=strategy)
    try:
        wait_for_step(run, child, 4)  # step 4's checkpoint is the one that meets the full disk
        failed_at = time.monotonic()
        output, _ = child.communicate(timeout=120)
        stopped_after = time.monotonic() - failed_at
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 1, output[-3000:]
    assert stopped_after < 60, f"took {stopped_after:.0f} s to stop after the failed checkpoint"
    failures = [line for line in output.splitlines() if line.startswith("training failed:")]
    assert len(failures) == 1, output[-3000:]  # one line per machine (local rank 0)
    assert f"could not write checkpoint {run.run_dir / 'checkpoints' / 'step-4'}" in failures[0]
    assert re.search("No space left on device|no space left on the filesystem of", failures[0]), failures[0]
    assert "newest complete checkpoint: step-2" in failures[0]
    assert run.exit_codes() == dict.fromkeys(range(processes), 1)  # every rank stopped by itself with 1
    assert_no_traceback_but_the_launchers(output, processes)
    root = run.run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-2"]  # no .tmp-step-4 left

    filler.unlink()
    run.step_log.unlink()
    resumed = run.launch("--set", "train.max_steps=4", "--resume", "auto", processes=processes, strategy=strategy)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resumed from" in resumed.stdout and "step-2" in resumed.stdout
    assert [step for step, _ in run.losses()] == [3, 4]
    assert [p.name for p in complete_checkpoints(run.run_dir)] == ["step-2", "step-4"]
    assert set(before) == {1, 2}


def test_full_disk_while_training_stops_tensorboard_not_the_run(make_run, small_disk):
    """The disk is full but for a few pages: TensorBoard's event thread dies of ENOSPC (one warning, no
    traceback) and training goes on; once space is freed, a SIGTERM still ends the run with a checkpoint
    and exit 0 (the failed event writer is not closed a second time)."""
    run = make_run("tb", "train.checkpoint_every=2", runs_dir=small_disk.path)
    assert run.launch("--set", "train.max_steps=2").returncode == 0
    filler = small_disk.fill(leave=8192)
    child = run.start("--set", "train.max_steps=400", "--set", "train.checkpoint_every=400", "--resume", "auto")
    try:
        seen = []
        for line in child.stdout:
            seen.append(line)
            if "logging (trackers, progress.json) stopped: [Errno 28] No space left on device" in line:
                break
        stopped_at = max(step for step, _ in run.losses())
        filler.unlink()
        child.send_signal(signal.SIGTERM)
        output = "".join(seen) + child.communicate(timeout=120)[0]
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, output[-3000:]
    assert "training goes on without it" in output and "Traceback" not in output, output[-3000:]
    last = max(step for step, _ in run.losses())
    assert stopped_at <= last < 400  # the run went on to the signal, with events stopped
    assert [p.name for p in complete_checkpoints(run.run_dir)] == ["step-2", f"step-{last}"]


def test_full_disk_under_the_sample_log_stops_every_rank_at_that_step(make_run, small_disk):
    """``train.sample_log``: a step whose record cannot be written ends the run at that step (exit 1, one
    line naming samples.jsonl) on both ranks, rather than leaving a record with a hole in it."""
    run = make_run("samples", "train.sample_log=true", "train.checkpoint_every=500", "log.tensorboard=false",
                   runs_dir=small_disk.path)
    assert run.launch("--set", "train.max_steps=2", processes=2).returncode == 0
    Path(f"{run.step_log}.exits").unlink()
    filler = small_disk.fill(leave=4096)  # room for the config and a few more lines of the record
    done = run.launch("--set", "train.max_steps=500", "--resume", "auto", processes=2)
    assert done.returncode == 1, done.stdout[-3000:]
    failure = re.search(r"training failed: could not append step (\d+) to (\S+): \[Errno 28\]", done.stdout)
    assert failure and failure.group(2).endswith("samples.jsonl"), done.stdout[-3000:]
    assert run.exit_codes() == {0: 1, 1: 1}
    assert_no_traceback_but_the_launchers(done.stdout, 2)
    failed_step = int(failure.group(1))
    assert max(step for step, _ in run.losses()) == failed_step  # both ranks stopped at that step
    lines = (run.run_dir / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, failed_step))  # whole lines only
    filler.unlink()
