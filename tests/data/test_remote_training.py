"""Training from object storage as a user runs it: test mode from s3:// for both debug models, retries in
TensorBoard, and a source stopped mid-epoch ending the run naming the URL, then ``--resume auto``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_prep.shard import shard_dataset
from data_prep.verify import verify
from dist_audio.config import load_config
from dist_audio.train.trainer import run_test_mode
from launch import evaluate

REPO = Path(__file__).resolve().parents[2]
DEBUG = {"sashimi": REPO / "configs/sashimi/debug.yaml", "tfswa": REPO / "configs/tfswa/debug.yaml"}
CORPUS = {"sashimi": ("speech", dict(layout="files", sample_rate=16000, channels=1, chunk_seconds=2.0,
                                     valid_fraction=0.25, max_per_shard=4, progress=False)),
          "tfswa": ("musdb", dict(layout="musdb", sample_rate=16000, channels=2, chunk_seconds=4.0, max_per_shard=3,
                                  progress=False))}
QUICK = ["data.batch_size=2", "data.num_workers=0", "train.val_batches=1", "log.audio_seconds=0.01",
         "log.progress_bar=false"]


@pytest.mark.parametrize("model", ["sashimi", "tfswa"])
def test_test_mode_trains_from_s3(model, demo_corpus, s3_bucket, tmp_path):
    """shard → upload → verify → train test mode (steps, checkpoint, resume, validation) from s3://; the
    secret key is nowhere in the run directory."""
    folder, options = CORPUS[model]
    url = f"{s3_bucket}/{folder}"
    shard_dataset(demo_corpus / folder, url, **options)
    assert verify(url) == []
    cfg = load_config(DEBUG[model], [f"data.shards={url}", f"train.runs_dir={tmp_path / 'runs'}", *QUICK],
                      check_data=True)
    result = run_test_mode(cfg)
    assert result.step > 0 and result.val_metrics
    run_files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" and url in p.read_text() for p in run_files)
    assert not any(os.environ["AWS_SECRET_ACCESS_KEY"].encode() in p.read_bytes() for p in run_files)
    run_dir = tmp_path / "runs" / f"{cfg.train.name}-test-mode"
    assert evaluate.main(["--checkpoint", str(run_dir), "--data", url, "--json", "--max-batches", "1"]) == 0


def test_retries_reach_tensorboard(speech_shards, range_server, tmp_path):
    server = range_server(speech_shards, fail_every=5)
    cfg = load_config(DEBUG["sashimi"], [f"data.shards={server.url}", f"train.runs_dir={tmp_path}", *QUICK],
                      check_data=True)
    result = run_test_mode(cfg)
    events = EventAccumulator(str(tmp_path / f"{cfg.train.name}-test-mode" / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    retries = [event.value for event in events.Scalars("data/remote_retries")]
    assert result.step > 0 and server.failures > 0 and 0 < retries[-1] <= server.failures


@pytest.mark.slow
def test_a_source_stopped_mid_epoch_ends_the_run_naming_it_and_resume_continues(speech_shards, range_server,
                                                                                 tmp_path):
    """The server goes away after the second checkpoint: the run ends with exit 1 and one line naming the
    URL and the last error within data.remote_timeout_s (plus shutdown); once the server is back on the
    same address, ``--resume auto`` continues from the checkpoint to the end."""
    server = range_server(speech_shards)
    timeout = 4
    command = [sys.executable, str(REPO / "launch/train.py"), "--config", str(DEBUG["sashimi"])]
    for item in [f"data.shards={server.url}", f"train.runs_dir={tmp_path}", f"data.remote_timeout_s={timeout}",
                 "train.max_steps=400", "train.checkpoint_every=2", "train.val_every=1000", *QUICK]:
        command += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    checkpoints = tmp_path / "sashimi-debug" / "checkpoints"
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (checkpoints / "step-4").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    server.stop()
    stopped = time.monotonic()
    _, stderr = run.communicate(timeout=timeout + 120)
    elapsed = time.monotonic() - stopped
    assert run.returncode == 1, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("training failed: data source http://127.0.0.1:") and "unreachable for 4 s" in last
    assert "last error:" in last and "Traceback" not in stderr
    assert elapsed < timeout + 60
    server.start()
    resumed = subprocess.run([*command, "--resume", "auto"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "(resumed from" in resumed.stderr and (checkpoints / "step-400").exists()
