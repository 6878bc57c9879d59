"""What a lost node or power cut leaves behind: a published checkpoint whose file is shorter than what
was written, or whose bytes changed. ``--resume auto`` checks every file against the size and SHA-256
recorded in ``trainer_state.json``, skips the damaged checkpoint with a warning and resumes from the one
before it, with the same losses as the first time. Also: a rank that cannot see the checkpoint directory
rank 0 made (node-local disks) stops the run with an error naming it."""

from __future__ import annotations

import json
import os

import pytest
from fault_runs import FAULTY_TRAIN

from dist_audio.train.checkpoint import STATE_FILE, complete_checkpoints, verify_checkpoint


def damage_truncate(path) -> str:
    size = path.stat().st_size
    os.truncate(path, size // 2)
    return f"has {size // 2} bytes, {size} were written"


def damage_flip_a_byte(path) -> str:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return "does not match the SHA-256"


@pytest.mark.parametrize("damage", [damage_truncate, damage_flip_a_byte], ids=["truncated", "flipped-byte"])
def test_damaged_checkpoint_is_skipped_for_the_previous_one(make_run, damage):
    run = make_run("lost", "train.max_steps=4", "train.checkpoint_every=2", "train.keep_last=2")
    assert run.launch().returncode == 0
    before = dict(run.losses())
    step_4 = run.run_dir / "checkpoints" / "step-4"
    recorded = json.loads((step_4 / STATE_FILE).read_text())["files"]
    assert {"state/.metadata", "state/__0_0.distcp", "rng/rank0.pt", "config.yaml"} <= set(recorded)
    assert verify_checkpoint(step_4) is None
    problem = damage(step_4 / "state" / "__0_0.distcp")
    assert problem in verify_checkpoint(step_4)

    run.step_log.unlink()
    resumed = run.launch("--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"skipping checkpoint {step_4}: state/__0_0.distcp {problem}" in resumed.stdout
    assert f"resumed from {run.run_dir / 'checkpoints' / 'step-2'}" in resumed.stdout
    after = dict(run.losses())
    assert after == {3: before[3], 4: before[4]}  # the steps after step-2 again, exactly
    assert [p.name for p in complete_checkpoints(run.run_dir)] == ["step-2", "step-4"]
    assert verify_checkpoint(step_4) is None  # rewritten whole


def test_a_rank_that_cannot_see_the_checkpoint_directory_stops_the_run(make_run, tmp_path):
    """Two ranks whose ``train.runs_dir`` are different directories (as node-local disks would be: the
    same path, another filesystem): rank 1 cannot see what rank 0 made, and both stop with exit 1."""
    run = make_run("local", "train.max_steps=2", "train.checkpoint_every=2")
    per_rank = tmp_path / "node-local"
    script = tmp_path / "per_node_runs_dir.py"
    # each rank sees its own runs_dir, as if /scratch were a local disk on each node
    script.write_text(
        "import os, runpy, sys\n"
        f"sys.argv = [sys.argv[0], *sys.argv[1:], '--set', f'train.runs_dir={per_rank}/rank' + os.environ['RANK']]\n"
        f"runpy.run_path({str(FAULTY_TRAIN)!r}, run_name='__main__')\n")
    done = run.launch(processes=2, script=script)
    assert done.returncode == 1, done.stdout[-3000:]
    failure = next(line for line in done.stdout.splitlines() if line.startswith("training failed:"))
    assert "cannot checkpoint to" in failure and "rank 1: cannot see" in failure, failure
    assert "must be on a filesystem shared by all nodes" in failure
    assert run.exit_codes() == {0: 1, 1: 1}
    assert not list((per_rank / "rank0" / "local" / "checkpoints").iterdir())  # the partial one removed

