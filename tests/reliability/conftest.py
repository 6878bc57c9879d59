"""Fixtures for the fault-injection tests (the shared helpers are in ``fault_runs``; ``small_disk``, a real
tmpfs, is in ``tests/conftest.py``)."""

from __future__ import annotations

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

