"""Shared fixtures: a synthetic demo corpus and small shard directories built from it (once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState

from data_prep.demo import make_demo_corpus
from data_prep.shard import shard_dataset


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/speech/`` (16 kHz mono clips) and ``root/musdb/{train,test}/`` (16 kHz stereo stems)."""
    return make_demo_corpus(tmp_path_factory.mktemp("demo_corpus"), seed=0)


@pytest.fixture(scope="session")
def speech_shards(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mono 16 kHz speech shards: 2 s chunks, at most 4 samples per shard (several shards per split)."""
    out = tmp_path_factory.mktemp("speech_shards")
    shard_dataset(demo_corpus / "speech", out, layout="files", sample_rate=16000, channels=1, chunk_seconds=2.0,
                  min_seconds=0.5, valid_fraction=0.25, max_per_shard=4, progress=False)
    return out


@pytest.fixture(scope="session")
def musdb_shards(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stereo 16 kHz stem shards (drums, bass, other, vocals): 4 s chunks, at most 3 samples per shard."""
    out = tmp_path_factory.mktemp("musdb_shards")
    shard_dataset(demo_corpus / "musdb", out, layout="musdb", sample_rate=16000, channels=2, chunk_seconds=4.0,
                  min_seconds=1.0, max_per_shard=3, progress=False)
    return out


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Tests that train in-process build their own Accelerator: drop Accelerate's process-wide singletons."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
