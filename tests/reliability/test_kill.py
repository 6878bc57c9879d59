"""``kill -9`` at several moments, in one process and in two (DDP): ``--resume auto`` never picks a
partial checkpoint and every step run again after the kill has exactly the loss it had before.

The kill is a deterministic SIGKILL from inside the training process (``faulty_train.py``), so each
moment is hit exactly. The killed run recorded the losses of its uninterrupted steps; the resumed run
must reproduce them. ``tests/train/test_train_cli.py`` already covers one process killed half-way
through writing a later checkpoint (``in_save`` with an earlier one complete).
"""

from __future__ import annotations

import signal

import pytest
from faulty_train import install

from dist_audio.train.checkpoint import STATE_FILE, complete_checkpoints
from launch import train as launch_train

SETTINGS = ["train.max_steps=6", "train.checkpoint_every=2", "train.keep_last=2"]


def checkpoint_names(run_dir) -> list[str]:
    return [p.name for p in complete_checkpoints(run_dir)]


@pytest.mark.parametrize(("fault", "complete_after_kill", "partial_after_kill", "resume_step"), [
    # killed after step 6's update, before its checkpoint: steps 5 and 6 are run again from step-4
    ("after_step:6", ["step-2", "step-4"], [], 4),
    # killed writing the first checkpoint: nothing complete, so a fresh start (never the partial one)
    ("in_save:2", [], [".tmp-step-2"], 0),
    # killed with everything of step 6 written except trainer_state.json, before the rename
    ("before_rename:6", ["step-2", "step-4"], [".tmp-step-6"], 4),
    # killed after step-6 was renamed, while keep_last was deleting step-2
    ("in_prune:6", ["step-4", "step-6"], ["step-2"], 6),
])
def test_kill_9_then_resume_auto_repeats_the_same_losses(make_run, monkeypatch, fault, complete_after_kill,
                                                         partial_after_kill, resume_step):
    run = make_run("killed", *SETTINGS)
    killed = run.launch(fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:]
    before = dict(run.losses())
    last_run = int(fault.split(":")[1])
    assert sorted(before) == list(range(1, last_run + 1))  # the steps before the kill ran uninterrupted
    root = run.run_dir / "checkpoints"
    assert checkpoint_names(run.run_dir) == complete_after_kill
    assert sorted(p.name for p in root.iterdir() if p.name not in complete_after_kill) == partial_after_kill
    assert all(not (root / name / STATE_FILE).exists() for name in partial_after_kill)

    run.step_log.unlink()
    install(None, run.step_log, setattr=monkeypatch.setattr)
    assert launch_train.main(run.args("--set", "train.max_steps=8", "--resume", "auto")) == 0
    after = dict(run.losses())
    assert sorted(after) == list(range(resume_step + 1, 9))
    for step in range(resume_step + 1, last_run + 1):
        assert after[step] == before[step], (step, after[step], before[step])
    # the partial leftovers are gone once the next checkpoints are written; the newest two are kept
    assert sorted(p.name for p in root.iterdir()) == ["step-6", "step-8"]


def test_kill_9_of_one_ddp_rank_while_checkpointing(make_run):
    """Rank 1 dies half-way through writing checkpoint 6; the launcher takes rank 0 down with it."""
    run = make_run("ddp", "train.max_steps=6", "train.checkpoint_every=3")
    killed = run.launch(fault="in_save:6@1", processes=2)
    assert killed.returncode != 0
    before = dict(run.losses())
    assert sorted(before) == list(range(1, 7))
    root = run.run_dir / "checkpoints"
    assert checkpoint_names(run.run_dir) == ["step-3"] and (root / ".tmp-step-6").is_dir()

    run.step_log.unlink()
    resumed = run.launch("--resume", "auto", processes=2)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resumed from" in resumed.stdout and "step-3" in resumed.stdout
    after = dict(run.losses())
    assert sorted(after) == [4, 5, 6]
    for step in (4, 5, 6):
        assert after[step] == before[step], (step, after[step], before[step])
    assert sorted(p.name for p in root.iterdir()) == ["step-3", "step-6"]
