"""End to end: ``accelerate launch launch/train.py`` at 2 CPU processes under a strategy, then
``launch/export.py`` on the run directory and ``load_model`` on one device.

One strategy runs in CI (ZeRO-3 with offload, the one users launch for the largest models); the
others are marked slow.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_audio.inference import load_model

ROOT = Path(__file__).resolve().parents[2]

CASES = [
    pytest.param("zero3_offload", "sashimi", "DEEPSPEED, ZeRO stage 3", id="zero3_offload-sashimi"),
    pytest.param("ddp", "tfswa", "MULTI_CPU", id="ddp-tfswa", marks=pytest.mark.slow),
    pytest.param("zero2", "tfswa", "DEEPSPEED, ZeRO stage 2", id="zero2-tfswa", marks=pytest.mark.slow),
    pytest.param("fsdp", "sashimi", "FSDP2 (fully_shard)", id="fsdp-sashimi", marks=pytest.mark.slow),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(("strategy", "model", "in_effect"), CASES)
def test_train_export_load(strategy: str, model: str, in_effect: str, tmp_path: Path, request):
    shards = request.getfixturevalue("speech_shards" if model == "sashimi" else "musdb_shards")
    env = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    train = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "configs" / "accelerate" / f"{strategy}.yaml"), "--num_processes", "2",
         "--main_process_port", str(free_port()), str(ROOT / "launch" / "train.py"),
         "--config", str(ROOT / "configs" / model / "debug.yaml"),
         "--set", f"data.shards={shards}", "--set", f"train.runs_dir={tmp_path / 'runs'}",
         "--set", "train.name=e2e", "--set", "train.max_steps=3", "--set", "train.checkpoint_every=3",
         "--set", "train.val_every=3", "--set", "train.val_batches=1", "--set", "optim.ema_decay=0.9",
         "--set", "train.activation_checkpointing=blocks", "--set", "log.tensorboard=false"],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
    log = train.stdout + train.stderr
    assert train.returncode == 0, log[-5000:]
    assert f"strategy: {in_effect}, world size 2" in log
    assert "activation checkpointing: blocks" in log

    run_dir = tmp_path / "runs" / "e2e"
    export = subprocess.run([sys.executable, str(ROOT / "launch" / "export.py"), str(run_dir), str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    assert "ema weights" in export.stdout
    for path in (tmp_path / "out", run_dir, run_dir / "checkpoints" / "step-3"):
        loaded, cfg = load_model(path, "cpu")
        assert cfg.model.name == model
    exported, _ = load_model(tmp_path / "out")
    for (name, a), b in zip(exported.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)  # run dir, checkpoint and export agree
