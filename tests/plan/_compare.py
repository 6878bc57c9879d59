"""Compare two ``launch/plan.py --json`` answers: what changed, split into deliberate and unexpected.

Deliberate (issue #11): the bf16 rows of DeepSpeed (ZeRO) and FSDP2 are traced as those engines run
(bf16 parameters), no longer under autocast, so their numbers move; the bf16 note's text and the trace
count follow. Everything else (every fp32 row, the DDP bf16 rows, the recommendation, the searched
limits and the launch line) must be equal. Timing fields are ignored.
"""

from __future__ import annotations

from typing import Any

TIMING = {"planner_seconds", "table_seconds", "traces_from_cache"}
DELIBERATE_KEYS = {"traces"}  # more traced steps: one bf16 trace per engine family


def _diffs(a: Any, b: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key in TIMING:
                continue
            out += _diffs(a.get(key), b.get(key), f"{path}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diffs(x, y, f"{path}[{i}]")]
    return [] if a == b else [(path, a, b)]


def compare_plans(before: dict, after: dict) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """(deliberate, unexpected) differences as (path, before, after)."""
    deliberate, unexpected = [], []
    engine_bf16 = {i for i, row in enumerate(before["rows"]) if row["precision"] == "bf16" and row["strategy"] != "ddp"}
    for path, old, new in _diffs(before, after):
        index = int(path.split("[")[1].split("]")[0]) if path.startswith(".rows[") else None
        if (index in engine_bf16 or path.lstrip(".") in DELIBERATE_KEYS
                or (path.startswith(".notes[") and "bf16" in str(old) + str(new))):
            deliberate.append((path, old, new))
        else:
            unexpected.append((path, old, new))
    return deliberate, unexpected
