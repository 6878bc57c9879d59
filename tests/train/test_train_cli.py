"""launch/train.py as users meet it: exit codes, one-line errors, run directories and signals."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _loss_signals import signal_on_loss_call

from dist_audio.train import trainer as trainer_lib
from dist_audio.train.checkpoint import complete_checkpoints
from dist_audio.train.trainer import SIGNAL_REPEAT_WINDOW_S
from launch import train as launch_train

REPO = Path(__file__).resolve().parents[2]


def cli_args(path, overrides, *extra):
    return ["--config", str(path), *[arg for item in overrides for arg in ("--set", item)], *extra]


@pytest.mark.parametrize(("override", "key"), [
    ("train.max_stepz=3", "train.max_stepz"),  # unknown key
    ("data.batch_size=many", "data.batch_size"),  # wrong type
    ("data.batch_size=-2", "data.batch_size"),  # negative size
    ("data.shards=/nonexistent/shards", "data.shards"),  # missing shard directory
    ("data.segment_seconds=30", "data.segment_seconds"),  # longer than the chunks in the shards
])
def test_config_errors_exit_2_naming_the_key(make_cfg, capsys, override, key):
    path, overrides, _ = make_cfg("sashimi")
    assert launch_train.main(cli_args(path, overrides, "--set", override)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"'{key}'" in err and "Traceback" not in err


def test_config_error_in_a_real_process_has_no_traceback(make_cfg):
    path, overrides, _ = make_cfg("sashimi")
    done = subprocess.run([sys.executable, str(REPO / "launch/train.py"),
                           *cli_args(path, overrides, "--set", "optim.lr=fast")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "'optim.lr'" in done.stderr


def test_existing_run_dir_needs_resume_or_overwrite(make_cfg, capsys):
    path, overrides, cfg = make_cfg("sashimi", "train.max_steps=2")
    args = cli_args(path, overrides)
    assert launch_train.main(args) == 0
    first = (cfg.run_dir / "checkpoints" / "step-2" / "trainer_state.json").read_text()
    capsys.readouterr()
    assert launch_train.main(args) == 2
    err = capsys.readouterr().err
    assert "'train.name'" in err and "--resume auto" in err and "--overwrite" in err
    assert (cfg.run_dir / "checkpoints" / "step-2" / "trainer_state.json").read_text() == first
    assert launch_train.main([*args, "--set", "train.max_steps=3", "--resume", "auto"]) == 0
    assert [p.name for p in complete_checkpoints(cfg.run_dir)] == ["step-2", "step-3"]
    assert launch_train.main([*args, "--overwrite"]) == 0
    assert [p.name for p in complete_checkpoints(cfg.run_dir)] == ["step-2"]


def test_sigterm_exits_0_with_resume_hint(make_cfg, monkeypatch, caplog):
    monkeypatch.setattr(trainer_lib, "build_objective", trainer_lib.build_objective)  # restored after the test
    signal_on_loss_call(3)
    path, overrides, cfg = make_cfg("sashimi", "train.max_steps=10")
    assert launch_train.main(cli_args(path, overrides)) == 0
    assert [p.name for p in complete_checkpoints(cfg.run_dir)] == ["step-3"]
    assert "stopped by SIGTERM after step 3" in caplog.text and "--resume auto" in caplog.text


SECOND_SIGNAL = textwrap.dedent(f"""
    import sys
    from _loss_signals import signal_on_loss_call
    from launch import train

    signal_on_loss_call(2, times=2, gap={SIGNAL_REPEAT_WINDOW_S + 0.5})
    sys.exit(train.main(sys.argv[1:]))
""")


def test_second_signal_exits_at_once(make_cfg):
    """A second signal after the repeat window (within it, it is the same one: tests/reliability)."""
    path, overrides, cfg = make_cfg("sashimi", "train.max_steps=10")
    done = subprocess.run([sys.executable, "-c", SECOND_SIGNAL, *cli_args(path, overrides)], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])})
    assert done.returncode == -signal.SIGTERM, done.stderr[-2000:]
    assert "survived" not in done.stdout
    assert complete_checkpoints(cfg.run_dir) == []


def test_check_validates_without_training(make_cfg, capsys):
    path, overrides, cfg = make_cfg("sashimi")
    assert launch_train.main(cli_args(path, overrides, "--check")) == 0
    assert not cfg.run_dir.exists()
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.yaml").write_text("model: {}\n")
    assert launch_train.main(cli_args(path, overrides, "--check")) == 2
    assert "'train.name'" in capsys.readouterr().err


def test_fp16_without_a_gpu_is_a_config_error_naming_the_key(make_cfg, capsys):
    path, overrides, cfg = make_cfg("sashimi", "train.mixed_precision=fp16")
    assert launch_train.main(cli_args(path, overrides)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'train.mixed_precision'" in err and "fp16 needs a CUDA GPU" in err
    assert not cfg.run_dir.exists()


@pytest.mark.parametrize("word", ["no", "fp32"])
def test_no_and_fp32_precision_are_accepted_on_the_command_line(make_cfg, word):
    path, overrides, _ = make_cfg("sashimi")
    assert launch_train.main([*cli_args(path, overrides, "--check"), "--set", f"train.mixed_precision={word}"]) == 0


KILLED_WHILE_CHECKPOINTING = textwrap.dedent("""
    import sys, time
    from dist_audio.train.portable_state import StateHolder
    from launch import train

    save = StateHolder.save

    def save_then_hang(self, directory):
        save(self, directory)
        if directory.parent.name == ".tmp-step-4":
            print("WRITING step 4", flush=True)
            time.sleep(300)

    StateHolder.save = save_then_hang
    sys.exit(train.main(sys.argv[1:]))
""")


def test_kill_9_while_checkpointing_resumes_from_previous_with_equal_losses(make_cfg):
    settings = ["train.max_steps=6", "train.checkpoint_every=2", "optim.warmup_steps=3"]
    _, _, reference_cfg = make_cfg("sashimi", *settings, "train.name=reference")
    accelerator = trainer_lib.make_accelerator(reference_cfg)
    reference = trainer_lib.Trainer(reference_cfg, accelerator).train().losses

    path, overrides, cfg = make_cfg("sashimi", *settings, "train.name=killed")
    child = subprocess.Popen([sys.executable, "-c", KILLED_WHILE_CHECKPOINTING, *cli_args(path, overrides)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    try:
        for line in child.stdout:
            if line.startswith("WRITING"):
                break
        child.kill()  # SIGKILL half-way through writing checkpoint step-4
    finally:
        child.wait(timeout=60)
    root = cfg.run_dir / "checkpoints"
    assert (root / ".tmp-step-4").is_dir() and [p.name for p in complete_checkpoints(cfg.run_dir)] == ["step-2"]

    resumed = trainer_lib.Trainer(cfg, trainer_lib.make_accelerator(cfg), resume=True)
    assert resumed.state.step == 2
    losses = resumed.train().losses
    assert losses.keys() == {3, 4, 5, 6}
    for step, loss in losses.items():
        assert math.isclose(loss, reference[step], rel_tol=1e-5), (step, loss, reference[step])
    assert [p.name for p in complete_checkpoints(cfg.run_dir)] == ["step-4", "step-6"]
    assert not (root / ".tmp-step-4").exists()
