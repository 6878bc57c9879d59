"""The seed questions answered as before the planner was sped up (``bench/results/plan_before/``):
every number equal except the DeepSpeed / FSDP2 bf16 rows, which are now traced with bf16 parameters
(``_compare.py`` says which differences are deliberate)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _compare import compare_plans

REPO = Path(__file__).parents[2]
QUESTIONS = [("configs/sashimi/seed-000.yaml", "1", "24GiB", "seed000_1x24"),
             ("configs/tfswa/seed-003.yaml", "1", "24GiB", "seed003_1x24"),
             ("configs/tfswa/seed-003.yaml", "8", "80GiB", "seed003_8x80")]


@pytest.mark.slow
@pytest.mark.parametrize("config, gpus, memory, name", QUESTIONS, ids=[q[3] for q in QUESTIONS])
def test_seed_question_predictions_unchanged(config, gpus, memory, name):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(REPO / "launch" / "plan.py"), "--config", config, "--gpus", gpus,
                          "--gpu-memory", memory, "--json", "--no-cache"], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True, timeout=900)
    before = json.loads((REPO / "bench" / "results" / "plan_before" / f"{name}.json").read_text())
    after = json.loads(out.stdout)
    deliberate, unexpected = compare_plans(before, after)
    assert unexpected == []
    changed = {int(p[6:p.index("]")]) for p, _, _ in deliberate if p.startswith(".rows[")}
    assert all(after["rows"][i]["precision"] == "bf16" and after["rows"][i]["strategy"] != "ddp" for i in changed)
