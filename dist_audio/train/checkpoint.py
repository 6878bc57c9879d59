"""The run directory and its checkpoints: durable atomic writes, verified newest-complete resume, ``keep_last``.

Layout (``../shared/INTERFACES.md``)::

    <runs_dir>/<name>/
        config.yaml                 resolved config of the latest start
        tb/                         TensorBoard event files
        checkpoints/step-<N>/       state/ (model, optimizer and EMA in the portable layout of
                                    ``portable_state``: one torch.distributed.checkpoint directory,
                                    readable by any strategy and world size), trainer_state.json
                                    (with the lr schedule and the size and SHA-256 of every other file),
                                    config.yaml, rng/rank<r>.pt

A checkpoint is written into ``checkpoints/.tmp-step-<N>/`` by every rank, fsynced (files, then
directories) and renamed to ``step-<N>`` only once every rank has finished, so a directory named
``step-<N>`` is complete even after a power or node loss; ``trainer_state.json`` is written last as a
second guard, and ``--resume auto`` skips a checkpoint whose files no longer match their recorded sizes
and hashes. The checkpoint directory must be one filesystem shared by all nodes: every rank writes its
shards into the directory rank 0 creates, and a rank that cannot see it stops the run with a clear error.
Everything the trainer itself writes loads with ``torch.load(weights_only=True)`` or JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pickle
import random
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from dist_audio.config import ConfigError, RunConfig, save_config
from dist_audio.train.durable import (
    WRITE_ERRORS,
    describe_error,
    file_digest,
    fsync_dir,
    fsync_file,
    fsync_tree,
    write_atomic,
)
from dist_audio.train.portable_state import StateHolder

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"step-(\d+)")
STATE_FILE = "trainer_state.json"
STATE_DIR = "state"  # the portable training state (portable_state)
FILES_KEY = "files"  # in trainer_state.json: {relative path: {"bytes", "sha256"}} of every other file
OWNER_FILE = ".owner"  # in a .tmp-step-N being written: which process of which host created it
SHARED_VISIBILITY_S = 10.0  # how long a rank waits to see the directory rank 0 created


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
    """The newest complete checkpoint that passes its integrity check, as ``--resume auto`` picks it; a
    newer one that fails it is skipped with a warning."""
    for checkpoint in reversed(complete_checkpoints(run_dir)):
        stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(checkpoint.rglob("*")))
        if _verified(str(checkpoint), stamp):
            return checkpoint
    return None


def verify_checkpoint(path: Path) -> str | None:
    """``None`` when every file ``trainer_state.json`` lists has its recorded size and SHA-256, else what
    is wrong. Checkpoints written before the sizes were recorded pass unchecked."""
    try:
        files = json.loads((Path(path) / STATE_FILE).read_text()).get(FILES_KEY, {})
    except (OSError, ValueError) as err:
        return f"{STATE_FILE} is unreadable ({describe_error(err)})"
    for name, entry in files.items():
        file = Path(path) / name
        try:
            size = file.stat().st_size
            if size != entry["bytes"]:
                return f"{name} has {size} bytes, {entry['bytes']} were written"
            if file_digest(file) != entry["sha256"]:
                return f"{name} does not match the SHA-256 recorded when it was written"
        except OSError as err:
            return f"{name} cannot be read ({describe_error(err)})"
    return None


@functools.lru_cache(maxsize=64)
def _verified(path: str, stamp: tuple) -> bool:
    """``verify_checkpoint`` once per checkpoint and process, again when any of its files changed
    (``stamp``: every file's path, size and mtime)."""
    problem = verify_checkpoint(Path(path))
    if problem:
        logger.warning("skipping checkpoint %s: %s; using the one before it", path, problem)
    return problem is None


def save_checkpoint(accelerator: Accelerator, run_dir: Path, cfg: RunConfig, state: TrainerState,
                    holder: StateHolder, keep_last: int) -> Path:
    """Write ``checkpoints/step-<state.step>`` durably and atomically on every rank, then prune to
    ``keep_last``.

    Every phase ends with the ranks agreeing on its outcome, so a failure on any rank (a full disk:
    ``OSError``, ``torch.save``'s ``RuntimeError``, DCP's ``CheckpointException``; a rank that cannot see
    the directory) reaches all of them at once: the partial directory is removed, earlier checkpoints are
    untouched and every rank raises the same one-line ``CheckpointError``.
    """
    root = checkpoint_dir(run_dir)
    final = root / f"step-{state.step}"
    tmp = root / f".tmp-step-{state.step}"
    rank = accelerator.process_index
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}" if accelerator.is_main_process else None
    error = _attempt(root, _prepare, root, tmp, token) if token else None
    errors, tokens = agree_on_errors(accelerator, error, token)
    _raise_if_failed(accelerator, errors, final, tmp)
    _raise_if_failed(accelerator, agree_on_errors(accelerator, _check_shared(tmp, tokens[0]))[0], final, tmp,
                     written=False)
    files: dict[str, dict[str, Any]] = {}
    try:
        holder.save(tmp / STATE_DIR)
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank{rank}.pt")
        files = _seal(tmp, _own_files(tmp, rank))
        error = None
    except WRITE_ERRORS as err:
        error = describe_error(err, tmp)
    errors, manifests = agree_on_errors(accelerator, error, files)
    _raise_if_failed(accelerator, errors, final, tmp)
    error = None
    if accelerator.is_main_process:
        try:
            claimed = {name: entry for manifest in manifests for name, entry in manifest.items()}
            _publish(tmp, final, cfg, state, claimed)
        except WRITE_ERRORS as err:
            error = describe_error(err, tmp)
        else:
            for old in complete_checkpoints(run_dir)[:-keep_last]:
                _remove(old)
    _raise_if_failed(accelerator, agree_on_errors(accelerator, error)[0], final, tmp)
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
    recorded = json.loads(state_file.read_text())
    recorded.pop(FILES_KEY, None)
    state = TrainerState(**recorded)
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


def _prepare(root: Path, tmp: Path, token: str) -> None:
    """Main rank: clear what kills left behind, create the temporary directory with the owner token."""
    root.mkdir(parents=True, exist_ok=True)
    # leftovers of a kill: unfinished writes, and old checkpoints half-deleted by keep_last
    for stale in root.iterdir():
        half_deleted = CHECKPOINT_PATTERN.fullmatch(stale.name) and not (stale / STATE_FILE).is_file()
        if stale.name.startswith(".tmp-step-") or half_deleted:
            shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    write_atomic(tmp / OWNER_FILE, token)


def _check_shared(tmp: Path, token: str) -> str | None:
    """``None`` when this rank sees the directory the main rank just made (same owner token), else why:
    the checkpoint directory must be one filesystem shared by every node. Waits a little for filesystems
    (NFS) whose other clients see a new entry late."""
    deadline = time.monotonic() + SHARED_VISIBILITY_S
    while True:
        try:
            if (tmp / OWNER_FILE).read_text() == token:
                return None
        except OSError:
            pass
        if time.monotonic() > deadline:
            return (f"cannot see {tmp}, which rank 0 created on {token.split(':')[0]}, from "
                    f"{socket.gethostname()}: train.runs_dir must be on a filesystem shared by all nodes "
                    "(checkpoints are written by every rank into one directory)")
        time.sleep(0.1)


def _own_files(tmp: Path, rank: int) -> list[Path]:
    """The files this rank wrote: its RNG state and its DCP data files (``__<rank>_<n>.distcp``)."""
    return [tmp / "rng" / f"rank{rank}.pt", *sorted((tmp / STATE_DIR).glob(f"__{rank}_*.distcp"))]


def _seal(tmp: Path, paths: list[Path]) -> dict[str, dict[str, Any]]:
    """fsync ``paths`` and record their sizes and SHA-256 (relative to ``tmp``)."""
    sealed = {}
    for path in paths:
        fsync_file(path)
        sealed[path.relative_to(tmp).as_posix()] = {"bytes": path.stat().st_size, "sha256": file_digest(path)}
    return sealed


def _publish(tmp: Path, final: Path, cfg: RunConfig, state: TrainerState,
             files: dict[str, dict[str, Any]]) -> None:
    """Main rank: seal the files no rank claimed (DCP metadata), write the config and, last, the trainer
    state with every file's size and hash; fsync the whole tree, rename it to ``final``, fsync the parent."""
    (tmp / OWNER_FILE).unlink()
    save_config(cfg, tmp / "config.yaml")
    rest = [p for p in sorted(tmp.rglob("*")) if p.is_file() and p.relative_to(tmp).as_posix() not in files]
    files = {**files, **_seal(tmp, rest)}
    write_atomic(tmp / STATE_FILE, json.dumps({**dataclasses.asdict(state), FILES_KEY: files}, indent=1))
    fsync_tree(tmp)
    if final.exists():
        _remove(final)
    tmp.rename(final)
    fsync_dir(final.parent)


def _attempt(where: Path, write: Any, *args: Any) -> str | None:
    try:
        write(*args)
    except WRITE_ERRORS as err:
        return describe_error(err, where)
    return None


def agree_on_errors(accelerator: Accelerator, error: str | None, payload: Any = None
                    ) -> tuple[list[str], list[Any]]:
    """Every rank's error (``"rank r: cause"``, ``None`` for none) and payload, on every rank: one collective,
    after a write that only some ranks do, so that none waits in a later collective for a rank that failed."""
    gathered = gather_object([(accelerator.process_index, error, payload)])
    errors = [f"rank {rank}: {message}" for rank, message, _ in gathered if message]
    return errors, [payload for _, _, payload in gathered]


def _raise_if_failed(accelerator: Accelerator, errors: list[str], final: Path, tmp: Path, *,
                     written: bool = True) -> None:
    if not errors:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    kept = complete_checkpoints(final.parent.parent)
    newest = f"newest complete checkpoint: {kept[-1].name}" if kept else "no earlier checkpoint"
    cause = "; ".join(errors[:2]) + (f" (and {len(errors) - 2} more ranks)" if len(errors) > 2 else "")
    what = "could not write checkpoint" if written else "cannot checkpoint to"
    raise CheckpointError(f"{what} {final}: {cause}; the partial checkpoint was removed ({newest})")



def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint so that a kill half-way never leaves it looking complete."""
    (checkpoint / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(checkpoint, ignore_errors=True)
