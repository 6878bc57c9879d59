"""Fixtures for the single-process trainer tests: the real debug configs on the conftest shards, shrunk."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_audio.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]
DEBUG_CONFIGS = {"sashimi": REPO / "configs/sashimi/debug.yaml", "tfswa": REPO / "configs/tfswa/debug.yaml"}
# small and quick: a few steps of tiny batches, no preview longer than a few milliseconds
QUICK = ["data.batch_size=2", "data.num_workers=0", "train.val_batches=1", "train.val_every=1000",
         "train.checkpoint_every=1000", "log.every=1", "log.audio_seconds=0.01", "log.progress_bar=false"]


@pytest.fixture
def make_cfg(tmp_path, speech_shards, musdb_shards):
    """``make_cfg(model, *overrides) -> (config path, overrides, RunConfig)`` for a run under tmp_path."""
    shards = {"sashimi": speech_shards, "tfswa": musdb_shards}

    def make(model: str, *overrides: str) -> tuple[Path, list[str], RunConfig]:
        items = [f"data.shards={shards[model]}", f"train.runs_dir={tmp_path / 'runs'}", *QUICK, *overrides]
        return DEBUG_CONFIGS[model], items, load_config(DEBUG_CONFIGS[model], items, check_data=True)

    return make
