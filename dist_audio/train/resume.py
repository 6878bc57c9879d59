"""What a resumed run may change, and how its batches are re-cut for the processes it has now.

A checkpoint stores the run config it was started with (``config.yaml``) and the global batch it
trained on (``trainer_state.json``). Resuming compares the config given now with the stored one:

- a change that breaks the run's meaning (the model, the data and how examples are cut from it, the
  global batch, the seed) is refused with ``error: resume changes <key>: <old> -> <new>`` unless the
  user names the key with ``--allow-change``;
- everything else (strategy, world size, workers, precision, learning rate, length, logging,
  checkpoint cadence, ...) is accepted and listed in the startup block.

The global batch is kept across world sizes: on M processes each rank takes global_batch / M samples
per step, cut into micro-batches no larger than ``data.batch_size`` (``BatchPlan``). Nothing here
touches a process group, so launch/train.py runs it before any worker trains.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dist_audio.config import ConfigError, RunConfig, config_from_dict, config_to_dict

__all__ = ["BREAKING", "BatchPlan", "ResumeChange", "ResumeConflict", "batch_plan", "check_resume",
           "checkpoint_global_batch", "config_changes", "stored_config"]

# Keys (or section prefixes ending in ".") whose change alters what the run computes.
BREAKING = (
    "model.",
    "data.shards", "data.task", "data.segment_seconds", "data.bits", "data.quantization", "data.interleave_stereo",
    "data.sources", "data.remix", "data.remix_gain", "data.shuffle_buffer",
    "data.batch_size", "train.grad_accum",  # the global batch
    "train.seed",
)
IGNORED = ("train.name", "train.runs_dir")  # they name the run directory itself


@dataclass(frozen=True)
class ResumeChange:
    key: str
    old: Any
    new: Any
    breaking: bool

    def __str__(self) -> str:
        return f"{self.key}: {self.old} -> {self.new}"


class ResumeConflict(ConfigError):
    """A resume would change what the run computes: ``resume changes <key>: <old> -> <new>``."""

    def __init__(self, change: ResumeChange):
        self.key = change.key
        ValueError.__init__(self, f"resume changes {change} (it alters what the run computes; pass "
                                  f"--allow-change {change.key} to continue anyway, or start a new run)")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _is_breaking(key: str) -> bool:
    return any(key.startswith(p) if p.endswith(".") else key == p for p in BREAKING)


def config_changes(stored: RunConfig, current: RunConfig) -> list[ResumeChange]:
    """Every key whose value differs between the checkpoint's config and this run's, in config order."""
    old, new = _flatten(config_to_dict(stored)), _flatten(config_to_dict(current))
    return [ResumeChange(key, old.get(key), new.get(key), _is_breaking(key))
            for key in dict.fromkeys([*old, *new]) if key not in IGNORED and old.get(key) != new.get(key)]


def stored_config(checkpoint: Path) -> RunConfig:
    return config_from_dict(yaml.safe_load((Path(checkpoint) / "config.yaml").read_text()))


def check_resume(checkpoint: Path, current: RunConfig, allowed: list[str]) -> list[ResumeChange]:
    """The accepted changes of resuming ``checkpoint`` with ``current``; raises ``ResumeConflict`` (exit 2)
    for the first breaking change not in ``allowed``, ``ConfigError`` for an allowed key that names nothing."""
    changes = config_changes(stored_config(checkpoint), current)
    known = _flatten(config_to_dict(current))
    for key in allowed:
        if key not in known:
            raise ConfigError(key, "--allow-change names no config key")
    for change in changes:
        if change.breaking and change.key not in allowed:
            raise ResumeConflict(change)
    return changes


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is cut on this world size."""

    global_batch: int  # samples per optimizer step, all ranks
    world_size: int
    micro_batch: int  # samples per forward/backward on one rank
    grad_accum: int  # micro-batches per rank and step

    def apply(self, cfg: RunConfig) -> RunConfig:
        """``cfg`` with ``data.batch_size`` / ``train.grad_accum`` set to this plan (a copy)."""
        cfg = copy.deepcopy(cfg)
        cfg.data.batch_size, cfg.train.grad_accum = self.micro_batch, self.grad_accum
        return cfg

    def describe(self) -> str:
        return (f"{self.micro_batch} per micro-step x {self.grad_accum} accumulation x {self.world_size} "
                f"processes = {self.global_batch} samples per optimizer step")


def batch_plan(cfg: RunConfig, world_size: int, global_batch: int | None = None) -> BatchPlan:
    """Cut ``global_batch`` (default: ``data.batch_size`` × ``train.grad_accum`` × ``world_size``) over
    ``world_size`` ranks, with micro-batches as large as possible but no larger than ``data.batch_size``."""
    global_batch = global_batch or cfg.data.batch_size * cfg.train.grad_accum * world_size
    if global_batch % world_size:
        allowed = [m for m in range(1, global_batch + 1) if global_batch % m == 0]
        raise ConfigError("data.batch_size", f"the run's global batch of {global_batch} samples does not split over "
                                             f"{world_size} processes; resume on {allowed} processes, or pass "
                                             "--allow-change data.batch_size to change the global batch")
    per_rank = global_batch // world_size
    micro = max(m for m in range(1, min(per_rank, cfg.data.batch_size) + 1) if per_rank % m == 0)
    return BatchPlan(global_batch, world_size, micro, per_rank // micro)


def checkpoint_global_batch(checkpoint: Path) -> int | None:
    """The global batch a checkpoint trained on (None for checkpoints that do not record it)."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return state.get("global_batch") or None

