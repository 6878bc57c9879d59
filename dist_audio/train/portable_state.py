"""Model, optimizer and EMA state in one layout for every strategy: written by any, read by any.

A checkpoint's training state is one ``torch.distributed.checkpoint`` (DCP) directory whose entries are
keyed by the plain model's names and hold full-precision values, whatever wrote them:

    model/<name>              fp32 weights (DeepSpeed: its fp32 master copy, not the bf16 working one)
    optim/<name>/exp_avg      AdamW's moments, fp32
    optim/<name>/exp_avg_sq
    optim/step                optimizer steps taken (AdamW's bias correction)
    ema/<name>                the EMA, when the run keeps one
    buffer/<name>             persistent module buffers

An entry is a plain tensor when every rank holds all of it (one device, DDP, ZeRO-1/2 parameters) and a
DTensor sharded along dim 0 over all ranks otherwise: FSDP2's own parameters and moments as they are;
ZeRO partitions (flat and padded, in DeepSpeed's own order) regathered one parameter at a time and cut
that way. DCP writes each element once and reads into whatever layout the loading run has, so a run
resumes on another world size or under another strategy; ``read_full_state`` reads it on one process
without a process group (export).

DCP's metadata file is a pickle; ``SafeFileSystemReader`` unpickles only DCP's own metadata classes, so
loading a checkpoint never runs code from it.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import io
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

__all__ = ["MOMENTS", "SafeFileSystemReader", "StateHolder", "gather_full", "like_placement", "read_full_state",
           "shard_rows"]

MOMENTS = ("exp_avg", "exp_avg_sq")
STEP_KEY = "optim/step"


class StateHolder(abc.ABC):
    """How one strategy exposes its training state in the portable layout (subclassed in ``parallelize``).

    ``parameter_entries()`` gives the ``model/`` and ``optim/`` entries (a collective under ZeRO); the
    tensors it returns are either the live ones (loading fills them in place) or copies, which
    ``load_parameter_entries`` writes back. ``ema`` (optional) provides ``portable()`` /
    ``load_portable()`` in the same way.
    """

    def __init__(self, model: nn.Module, ema: Any | None):
        self.model, self.ema = model, ema

    @abc.abstractmethod
    def parameter_entries(self) -> dict[str, Tensor]:
        """The ``model/`` and ``optim/`` entries of this rank."""

    @abc.abstractmethod
    def load_parameter_entries(self, entries: dict[str, Tensor]) -> None:
        """Take back what ``parameter_entries`` gave, after DCP loaded into it."""

    @abc.abstractmethod
    def optimizer_steps(self) -> int:
        """The optimizer's own step counter."""

    @abc.abstractmethod
    def set_optimizer_steps(self, steps: int) -> None:
        """Set that counter on every parameter's state."""

    @abc.abstractmethod
    def prepare_load(self) -> None:
        """Create whatever the optimizer builds lazily, so every entry has a tensor to load into."""

    def buffers(self) -> dict[str, Tensor]:
        """Persistent buffers by plain name (replicated under every strategy)."""
        from dist_audio.train.parallelize import plain_name, unwrap_model

        inner = unwrap_model(self.model)
        persistent = {plain_name(k) for k in inner.state_dict(keep_vars=True)}
        return {plain_name(n): b for n, b in inner.named_buffers() if plain_name(n) in persistent}

    def state_dict(self) -> dict[str, Tensor]:
        """Every entry of the portable layout (collective under ZeRO)."""
        state = {STEP_KEY: torch.tensor(self.optimizer_steps(), dtype=torch.int64), **self.parameter_entries()}
        state |= {f"buffer/{name}": b.detach().cpu().clone() for name, b in self.buffers().items()}
        if self.ema is not None:
            state |= {f"ema/{name}": t for name, t in self.ema.portable().items()}
        return state

    def save(self, directory: str | Path) -> None:
        """Write the state into ``directory`` (collective; every rank writes its shards)."""
        with _quiet_single_process():
            dcp.save(self.state_dict(), checkpoint_id=str(directory), no_dist=not dist.is_initialized())

    def load(self, directory: str | Path) -> None:
        """Read ``directory`` into this run's layout, resharding as needed (collective)."""
        self.prepare_load()
        targets = self.state_dict()  # the keys, shapes and placements this run holds
        reader = SafeFileSystemReader(str(directory))
        missing = sorted(set(targets) - set(reader.read_metadata().state_dict_metadata))
        if missing:
            raise KeyError(f"{directory} lacks {len(missing)} state entries, e.g. {missing[0]} "
                           "(a checkpoint of another model?)")
        with _quiet_single_process():
            dcp.load(targets, storage_reader=reader, no_dist=not dist.is_initialized())
        self.load_parameter_entries(targets)
        for name, buffer in self.buffers().items():
            buffer.copy_(targets[f"buffer/{name}"])
        self.set_optimizer_steps(int(targets[STEP_KEY]))
        if self.ema is not None:
            self.ema.load_portable({k[len("ema/"):]: v for k, v in targets.items() if k.startswith("ema/")})


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every call without a process group that it assumes one process: it is right."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


# --------------------------------------------------------------------------------------------------
# sharded entries
# --------------------------------------------------------------------------------------------------


@functools.cache
def _world_mesh(device_type: str, world_size: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world_size,))


def shard_rows(full: Tensor, comm_device: torch.device) -> Tensor:
    """A full tensor held by every rank as this rank's dim-0 shard (a DTensor, local part on CPU); a
    plain CPU tensor with one process. No communication: each rank keeps its own rows."""
    full = full.detach().float().cpu()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return full
    mesh = _world_mesh(comm_device.type, dist.get_world_size())
    chunks = torch.chunk(full, dist.get_world_size(), dim=0) if full.dim() else (full,)
    rank = dist.get_rank()
    local = chunks[rank] if rank < len(chunks) else full[:0]
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride())


def gather_full(value: Tensor, comm_device: torch.device) -> Tensor:
    """The whole tensor on every rank, on the CPU: a DTensor is gathered through ``comm_device`` (its
    local part may live on the CPU while the process group speaks NCCL); a plain tensor is returned."""
    if not isinstance(value, DTensor):
        return value.detach().cpu()
    local = value.to_local().to(comm_device)
    on_device = DTensor.from_local(local, value.device_mesh, value.placements, run_check=False,
                                   shape=value.shape, stride=value.stride())
    return on_device.full_tensor().cpu()


def like_placement(full: Tensor, reference: Tensor) -> Tensor:
    """``full`` laid out like ``reference`` (a DTensor's local shard, or the whole tensor)."""
    if not isinstance(reference, DTensor):
        return full
    return distribute_tensor(full.to(reference.to_local().device), reference.device_mesh, reference.placements,
                             src_data_rank=None)


# --------------------------------------------------------------------------------------------------
# reading without a process group, safely
# --------------------------------------------------------------------------------------------------


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and nothing else: its dataclasses and enums, torch sizes and dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint.") or (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not "
                                     "part of torch.distributed.checkpoint's metadata")


# what DCP's Metadata pickles besides its own classes: sizes, layouts by name, the checkpoint path
_ALLOWED_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}


class SafeFileSystemReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose metadata is read by ``_MetadataUnpickler`` instead of ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(io.BytesIO(stream.read())).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_full_state(directory: str | Path, prefix: str) -> dict[str, Tensor]:
    """Every entry under ``prefix`` (e.g. ``"model/"``) as a full CPU tensor, keyed without the prefix;
    one process, no process group."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = SafeFileSystemReader(str(directory))
    entries = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in reader.read_metadata().state_dict_metadata.items()
               if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    with _quiet_single_process():
        dcp.load(entries, storage_reader=reader, no_dist=True)
    return {key[len(prefix):]: value for key, value in entries.items()}
