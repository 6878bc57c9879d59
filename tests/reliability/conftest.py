"""Fixtures for the fault-injection tests (the shared helpers are in ``fault_runs``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from fault_runs import QUICK, SASHIMI_DEBUG, Run


@pytest.fixture
def make_run(tmp_path, speech_shards):
    """``make_run(name, *overrides, shards=..., runs_dir=...) -> Run``: the debug SaShiMi under
    ``runs_dir`` (default ``tmp_path/runs``)."""

    def make(name: str, *overrides: str, shards: Path = speech_shards, runs_dir: Path | None = None) -> Run:
        runs_dir = runs_dir or tmp_path / "runs"
        items = [f"data.shards={shards}", f"train.runs_dir={runs_dir}", f"train.name={name}", *QUICK, *overrides]
        return Run(SASHIMI_DEBUG, items, runs_dir / name, tmp_path / f"{name}.steps.jsonl")

    return make


@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MB filesystem (tmpfs) at ``tmp_path/disk``, unmounted after the test; skipped where this
    process may not mount one (not root, no CAP_SYS_ADMIN, not Linux)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True,
                             text=True) if shutil.which("mount") else None
    if mounted is None or mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() if mounted else 'no mount command'}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
