"""Resuming with a changed config: what is refused (exit 2, one line naming the key), what is accepted and
said at start, and how a global batch is re-cut for another world size."""

from __future__ import annotations

import json
import logging

import pytest

from dist_audio.config import ConfigError
from dist_audio.train.resume import batch_plan, config_changes
from launch import train as launch_train


def cli_args(path, overrides, *extra):
    return ["--config", str(path), *[arg for item in overrides for arg in ("--set", item)], *extra]


@pytest.fixture
def finished_run(make_cfg, capsys):
    """A run of 2 steps with a checkpoint; returns (config path, overrides) to resume it with."""
    path, overrides, _ = make_cfg("sashimi", "train.max_steps=2")
    assert launch_train.main(cli_args(path, overrides)) == 0
    capsys.readouterr()
    return path, overrides


@pytest.mark.parametrize(("change", "line"), [
    ("model.d_model=32", "error: resume changes model.d_model: 16 -> 32"),
    ("data.batch_size=4", "error: resume changes data.batch_size: 2 -> 4"),
    ("train.seed=7", "error: resume changes train.seed: 0 -> 7"),
])
def test_a_change_that_breaks_the_run_exits_2_naming_the_key(finished_run, capsys, change, line):
    path, overrides = finished_run
    assert launch_train.main(cli_args(path, overrides, "--set", change, "--resume", "auto")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(line + " ") and "--allow-change" in err


def test_allow_change_continues_and_says_so(finished_run, make_cfg, caplog):
    path, overrides = finished_run
    caplog.set_level(logging.INFO)
    args = cli_args(path, overrides, "--set", "data.batch_size=4", "--set", "train.max_steps=3", "--resume", "auto",
                    "--allow-change", "data.batch_size")
    assert launch_train.main(args) == 0
    assert "resumed with a changed config: data.batch_size: 2 -> 4 (allowed by --allow-change)" in caplog.text
    assert "resumed with a changed config: train.max_steps: 2 -> 3" in caplog.text
    assert "4 per micro-step x 1 accumulation x 1 processes = 4 samples" in caplog.text
    _, _, cfg = make_cfg("sashimi")
    state = json.loads((cfg.run_dir / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert (state["global_batch"], state["world_size"], state["samples_seen"]) == (4, 1, 2 * 2 + 4)


def test_allow_change_must_name_a_config_key(finished_run, capsys):
    path, overrides = finished_run
    assert launch_train.main(cli_args(path, overrides, "--resume", "auto", "--allow-change", "data.batchsize")) == 2
    assert "'data.batchsize'" in capsys.readouterr().err


def test_safe_changes_are_listed_not_refused(make_cfg):
    _, _, old = make_cfg("sashimi")
    _, _, new = make_cfg("sashimi", "optim.lr=0.001", "data.num_workers=1", "train.mixed_precision=bf16",
                         "train.checkpoint_every=7", "log.every=3")
    changes = config_changes(old, new)
    assert {c.key for c in changes} == {"optim.lr", "data.num_workers", "train.mixed_precision",
                                        "train.checkpoint_every", "log.every"}
    assert not any(c.breaking for c in changes)


@pytest.mark.parametrize(("batch", "accum", "world", "global_batch", "expected"), [
    (4, 1, 2, None, (8, 4, 1)),  # as configured
    (4, 1, 1, 8, (8, 4, 2)),  # 2 ranks' global batch on one process: accumulate twice
    (4, 2, 4, 16, (16, 4, 1)),
    (3, 1, 3, 6, (6, 2, 1)),  # 6 over 3 ranks: micro-batches of 2
    (4, 1, 3, 12, (12, 4, 1)),
    (5, 1, 2, 10, (10, 5, 1)),
    (4, 1, 2, 10, (10, 1, 5)),  # 5 per rank, at most 4 per micro-batch: 5 × 1
])
def test_batch_plan_keeps_the_global_batch(make_cfg, batch, accum, world, global_batch, expected):
    _, _, cfg = make_cfg("sashimi", f"data.batch_size={batch}", f"train.grad_accum={accum}")
    plan = batch_plan(cfg, world, global_batch)
    assert (plan.global_batch, plan.micro_batch, plan.grad_accum) == expected
    assert plan.micro_batch * plan.grad_accum * world == plan.global_batch


def test_a_global_batch_that_does_not_split_names_the_world_sizes_that_do(make_cfg):
    _, _, cfg = make_cfg("sashimi", "data.batch_size=4")
    with pytest.raises(ConfigError, match=r"global batch of 8 samples does not split over 3 processes.*\[1, 2, 4, 8\]"):
        batch_plan(cfg, 3, 8)
