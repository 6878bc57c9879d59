"""The run directory and its checkpoints: atomic writes, newest-complete resume, ``keep_last``.

Layout (``../shared/INTERFACES.md``)::

    <runs_dir>/<name>/
        config.yaml                 resolved config of the latest start
        tb/                         TensorBoard event files
        checkpoints/step-<N>/       state/ (model, optimizer and EMA in the portable layout of
                                    ``portable_state``: one torch.distributed.checkpoint directory,
                                    readable by any strategy and world size), trainer_state.json
                                    (with the lr schedule), config.yaml, rng/rank<r>.pt

A checkpoint is written into ``checkpoints/.tmp-step-<N>/`` and renamed to ``step-<N>`` only once every
rank has finished writing, so a directory named ``step-<N>`` is always complete; ``trainer_state.json``
is written last as a second guard. Everything the trainer itself writes loads with
``torch.load(weights_only=True)`` or JSON.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from dist_audio.config import ConfigError, RunConfig, save_config
from dist_audio.train.portable_state import StateHolder

CHECKPOINT_PATTERN = re.compile(r"step-(\d+)")
STATE_FILE = "trainer_state.json"
STATE_DIR = "state"  # the portable training state (portable_state)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says what was kept."""


@dataclass
class TrainerState:
    """Where training stands; enough, with the model/optimizer state and RNG, to continue exactly."""

    step: int = 0  # optimizer steps taken (skipped non-finite steps included)
    epoch: int = 0
    samples_in_epoch: int = 0  # epoch positions consumed, all ranks: where the global data order goes on
    samples_seen: int = 0  # training samples of all ranks, skipped steps included
    global_batch: int = 0  # samples per optimizer step, all ranks: kept by a resume on another world size
    world_size: int = 0  # processes that wrote the checkpoint
    strategy: str = ""  # what it was written under, e.g. "FSDP2 (fully_shard) x 2"
    skipped_samples: int = 0  # corrupt samples the loader skipped, all ranks
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient
    oom_retries: int = 0
    micro_splits: int = 1  # auto_fit: each loaded batch is split into this many micro-batches
    schedule: dict[str, Any] = field(default_factory=dict)  # LRSchedule.state_dict()
    loss_scale: dict[str, Any] = field(default_factory=dict)  # fp16: parallelize.loss_scale_state()


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a fresh run over an existing run directory (a user error: exit code 2)."""
    if resume or overwrite or not run_dir.exists() or not any(run_dir.iterdir()):
        return
    raise ConfigError("train.name", f"run directory {run_dir} already exists; pass --resume auto to "
                                    "continue it or --overwrite to start it again from scratch")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary and half-written ones are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_PATTERN.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.fullmatch(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, as ``--resume auto`` picks it."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(accelerator: Accelerator, run_dir: Path, cfg: RunConfig, state: TrainerState,
                    holder: StateHolder, keep_last: int) -> Path:
    """Write ``checkpoints/step-<state.step>`` atomically on every rank, then prune to ``keep_last``.

    On any write error (disk full, ...) the partial directory is removed, earlier checkpoints are left
    untouched and ``CheckpointError`` says so.
    """
    root = checkpoint_dir(run_dir)
    final = root / f"step-{state.step}"
    tmp = root / f".tmp-step-{state.step}"
    rank = accelerator.process_index
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        # leftovers of a kill: unfinished writes, and old checkpoints half-deleted by keep_last
        for stale in root.iterdir():
            half_deleted = CHECKPOINT_PATTERN.fullmatch(stale.name) and not (stale / STATE_FILE).is_file()
            if stale.name.startswith(".tmp-step-") or half_deleted:
                shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    error = None
    try:
        holder.save(tmp / STATE_DIR)
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank{rank}.pt")
    except OSError as err:
        error = err
    if not _all_ranks_ok(accelerator, error is None):
        _discard(accelerator, tmp)
        raise CheckpointError(f"could not write checkpoint {final}: {error or 'failed on another rank'}; "
                              f"the partial checkpoint was removed and earlier checkpoints are intact") from error
    if accelerator.is_main_process:
        try:
            save_config(cfg, tmp / "config.yaml")
            (tmp / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=1))
            if final.exists():
                _remove(final)
            tmp.rename(final)
        except OSError as err:
            error = err
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            for old in complete_checkpoints(run_dir)[:-keep_last]:
                _remove(old)
    if not _all_ranks_ok(accelerator, error is None):
        raise CheckpointError(f"could not write checkpoint {final}: {error or 'failed on the main rank'}; "
                              f"the partial checkpoint was removed and earlier checkpoints are intact")
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, holder: StateHolder) -> TrainerState:
    """Restore model, optimizer, EMA and this rank's RNG from ``path`` (written under any strategy and
    world size); returns the trainer state. A rank the checkpoint had no RNG for keeps its own streams."""
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    if not (Path(path) / STATE_DIR).is_dir():
        raise CheckpointError(f"{path} was written by an older version of dist_audio (no {STATE_DIR}/); "
                              "it cannot be resumed or exported by this one")
    state = TrainerState(**json.loads(state_file.read_text()))
    rng_file = Path(path) / "rng" / f"rank{accelerator.process_index}.pt"
    try:
        holder.load(Path(path) / STATE_DIR)
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
    except pickle.UnpicklingError as err:  # a file in it holds something that is not plain data
        raise CheckpointError(f"refused to load {path}: a file in it holds pickled objects that are not "
                              f"tensors or plain data ({str(err).splitlines()[0]})") from None
    return state


def rng_state() -> dict[str, Any]:
    """Every random stream of this process, as tensors and plain numbers (loads with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"].tolist()),
                     python_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_ranks_ok(accelerator: Accelerator, ok: bool) -> bool:
    flag = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == 0


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint so that a kill half-way never leaves it looking complete."""
    (checkpoint / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(checkpoint, ignore_errors=True)


def _discard(accelerator: Accelerator, tmp: Path) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
