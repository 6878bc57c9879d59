"""Malformed input to ``launch/train.py``: exit code 2, one line on stderr naming the key, no traceback,
nothing written. The cases in ``tests/train/test_train_cli.py`` (unknown top key, wrong int type,
negative batch size, missing shards, segment longer than the chunks) are not repeated here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch import train as launch_train

REPO = Path(__file__).resolve().parents[2]
SASHIMI_DEBUG = REPO / "configs/sashimi/debug.yaml"

BAD_OVERRIDES = [
    ("model.d_modle=16", "model.d_modle", "unknown key"),  # typo inside a section
    ("optimiser.lr=1e-3", "optimiser", "unknown key"),  # unknown section
    ("train.max_steps=1.5", "train.max_steps", "expected an integer"),
    ("log.progress_bar=maybe", "log.progress_bar", "expected true or false"),
    ("optim.betas=[0.9]", "optim.betas", "two values"),
    ("optim.schedule=linear", "optim.schedule", "must be one of"),
    ("model.name=wavenet", "model.name", "must be one of"),
    ("data.segment_seconds=-0.5", "data.segment_seconds", "must be > 0"),
    ("train.keep_last=0", "train.keep_last", "must be > 0"),
    ("data.max_bad_fraction=2", "data.max_bad_fraction", "must be in [0, 1]"),
    ("data.bits=12", "data.bits", "must equal model.bits"),  # inconsistent sections
    ("data.segment_seconds=1.9", "data.segment_seconds", "re-shard with a larger --chunk-seconds"),
    ("train.name=a/b", "train.name", "without '/'"),
    ("data", "data", "key.path=value"),  # not an override at all
]


@pytest.mark.parametrize("check", [False, True], ids=["train", "check"])
@pytest.mark.parametrize(("override", "key", "reason"), BAD_OVERRIDES, ids=[c[1] for c in BAD_OVERRIDES])
def test_bad_override_exits_2_naming_the_key(make_run, capsys, override, key, reason, check):
    run = make_run("bad")
    assert launch_train.main(run.args("--set", override, *(["--check"] if check else []))) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and f"'{key}'" in err and reason in err and "Traceback" not in err
    assert not run.run_dir.exists()


@pytest.mark.parametrize(("text", "problem"), [
    ("model: {name: sashimi\n", "is not valid YAML"),
    ("- just\n- a list\n", "must hold a mapping"),
])
def test_unreadable_config_file_exits_2(tmp_path, capsys, text, problem):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert launch_train.main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and problem in err and "Traceback" not in err


def test_bad_config_in_a_real_process_leaves_no_traceback(make_run, tmp_path):
    """The whole file path, as a user meets it: a wrong-typed value inside the YAML itself."""
    config = yaml.safe_load(SASHIMI_DEBUG.read_text())
    config["optim"]["grad_clip"] = "one"
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    run = make_run("typo")
    run.config = path
    done = subprocess.run([sys.executable, str(REPO / "launch/train.py"), *run.args()], cwd=REPO, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=180)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "'optim.grad_clip'" in done.stderr and "Traceback" not in done.stderr
    assert not run.run_dir.exists()


@pytest.mark.slow
def test_strategy_the_launch_config_cannot_do_is_one_error_line(make_run, tmp_path):
    """Parameter offload without ZeRO-3: found when the workers set up the strategy (``--check`` cannot
    see the Accelerate config); every worker stops with exit 2 and one line, no traceback of ours.
    The launcher then reports the failed worker in its own words."""
    launch_cfg = yaml.safe_load((REPO / "configs/accelerate/zero2.yaml").read_text())
    launch_cfg["deepspeed_config"]["offload_param_device"] = "cpu"
    launch_cfg["num_processes"] = 1
    launch_path = tmp_path / "zero2_param_offload.yaml"
    launch_path.write_text(yaml.safe_dump(launch_cfg))
    run = make_run("offload")
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_path),
                           "--quiet", str(REPO / "launch/train.py"), *run.args()], cwd=REPO, text=True,
                          capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: parameter offload needs ZeRO stage 3"], done.stderr[-3000:]
    assert "dist_audio/" not in "".join(line for line in done.stderr.splitlines() if line.startswith('  File "'))
