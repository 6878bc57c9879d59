"""Shared fixtures: a synthetic demo corpus and small shard directories built from it (once per session), and
a real small filesystem to fill up (`small_disk`)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass
class SmallDisk:
    """A real 8 MB filesystem (tmpfs) mounted at ``path``, for faults that a full disk causes."""

    path: Path

    def fill(self, leave: int) -> Path:
        """Fill it with one file until the filesystem refuses more, then give back ``leave`` bytes;
        returns the file (delete it to free the space)."""
        filler = self.path / "filler"
        with open(filler, "wb", buffering=0) as out:
            try:
                while True:
                    out.write(b"\0" * (1 << 16))
            except OSError:
                pass
        os.truncate(filler, max(0, filler.stat().st_size - leave))
        return filler


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """An 8 MB tmpfs at ``tmp_path/disk``, unmounted after the test; skipped where this process may not
    mount one (not root, no CAP_SYS_ADMIN, not Linux)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True,
                             text=True) if shutil.which("mount") else None
    if mounted is None or mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() if mounted else 'no mount command'}")
    try:
        yield SmallDisk(disk)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
