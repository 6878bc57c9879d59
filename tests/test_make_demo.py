"""``launch/demo.py`` end to end on the test corpus, a couple of steps: the flow ``make demo`` shows."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import soundfile as sf

REPO = Path(__file__).resolve().parents[1]


def test_demo_asks_the_planner_trains_sharded_and_writes_audio(tmp_path, demo_corpus, speech_shards, musdb_shards):
    data = tmp_path / "data"  # the layout `make demo-data` writes
    (data / "shards").mkdir(parents=True)
    (data / "shards/speech").symlink_to(speech_shards)
    (data / "shards/musdb").symlink_to(musdb_shards)
    (data / "audio").symlink_to(demo_corpus)
    runs, out = tmp_path / "runs", tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "launch/demo.py"), "--data", str(data), "--runs-dir", str(runs),
                           "--out", str(out), "--steps", "2", "--seconds", "0.1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO), "DIST_AUDIO_PLAN_CACHE": str(tmp_path / "plan")})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    shown = done.stdout

    # the planner was asked, and its answer shown
    for model in ("tfswa", "sashimi"):
        assert f"launch/plan.py --config configs/{model}/debug.yaml" in shown
        plan = json.loads((out / f"plan-{model}.json").read_text())
        assert plan["recommended"] and plan["rows"]
    assert "fsdp, checkpointing none, fp32:" in shown

    # TF-SWA ran on 2 processes under FSDP2 to its last step; both runs showed progress
    log = (runs / "demo-tfswa.log").read_text()
    assert "strategy: FSDP2 (fully_shard), world size 2" in log and "this rank holds 7,600 of 15,200" in log
    state = json.loads((runs / "demo-tfswa/checkpoints/step-2/trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["strategy"] == "FSDP2 (fully_shard) x 2"
    assert re.search(r"tfswa +fsdp \(FSDP2\), 2 processes +step +2/2 .* done in", shown)
    assert re.search(r"sashimi +single, 1 process +step +2/2 .* done in", shown)

    # audio was written: SaShiMi's clips, and every stem of the test mixture at its length
    generated = sorted((out / "generated").glob("*.wav"))
    assert len(generated) == 2 and all(sf.info(p).frames == 1600 for p in generated)
    mixture = sorted((data / "audio/musdb/test").glob("*/mixture.wav"))[0]
    stems = {p.stem: sf.info(p) for p in (out / "separated").glob("*.wav")}
    assert set(stems) == {"drums", "bass", "other", "vocals"}
    assert all(info.frames == sf.info(mixture).frames for info in stems.values())

    # the figures, and the way to TensorBoard
    assert all((out / "figures" / f"{model}.png").stat().st_size > 10_000 for model in ("tfswa", "sashimi"))
    assert re.fullmatch(r"  open TensorBoard: +\S*tensorboard --logdir runs", shown.splitlines()[-1])
