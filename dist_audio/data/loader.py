"""Per-rank batches from ``data_prep.shard`` output: a plain function of (config, split, rank, world size,
seed, epoch, where in the epoch to start).

Training reads one global order (``dist_audio.data.order``): epoch positions ``0 .. E-1``, each a sample
and a crop offset, fixed by the manifest, the seed and the epoch alone. With a global batch of G samples
and M ranks, optimizer step ``j`` covers positions ``[start_sample + jG, start_sample + (j+1)G)``; rank
``r`` takes the contiguous slice ``r·G/M .. (r+1)·G/M`` of it, as G/M/batch_size micro-batches in order.
Only whole steps are yielded, so every rank yields the same count, and a step's samples do not depend
on how many ranks or workers read them: a run resumed on another world size (``start_sample`` = samples
consumed so far) continues with exactly the examples the original run would have read.

A position whose sample cannot be used (unreadable shard, corrupt member, bad metadata) is filled by the
next usable sample of the order (wrapping at the end), cropped with the position's own offset draw; every
reader applies the same rule, so the batch is the same for all of them, and the position counts once in
the batch's ``skipped``.

Validation is unshuffled: every chunk is cut into fixed crops ``0, seg, 2·seg, …`` (the last aligned to
the chunk's end). Each worker walks all crops in manifest order (headers only: validation sets are small)
and decodes only the batches it owns, so each crop is produced once across ranks and workers, and the
last batches carry padding rows (``mask`` False) so all ranks yield the same count.

With ``num_workers > 0`` a torch ``DataLoader`` asks its workers round-robin, so micro-batch ``i`` of
this loader is made by worker ``i % num_workers``, which computes it from scratch (shard indexes and a
few open shard files are cached per worker).

``data.shards`` may be a URL (``s3://``, ``gs://``, ``http(s)://``): the manifest, the shard indexes and
the crops are then fetched with ranged reads (``dist_audio.storage``), retried on transient errors; each
batch carries ``remote_retries`` (retries since the previous batch of that worker), and a source down for
longer than ``data.remote_timeout_s`` raises ``SourceUnavailable``. ``data.cache_dir`` keeps indexes and
fetched blocks on local disk.

We read tar files ourselves rather than with ``webdataset`` because we need random access into a
member so a crop decodes only its own bytes, samples addressed by position rather than streamed, no
pickle decoding, and a count of every skipped sample; the shards stay plain WebDataset shards that
``webdataset.WebDataset`` reads too. See ``dist_audio.data.shards`` for the reading.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_audio.config import ConfigError, DataConfig
from dist_audio.data.manifest import read_manifest
from dist_audio.data.order import EpochOrder, counter_uniform
from dist_audio.data.quantize import pcm16_table, zero_level
from dist_audio.data.shards import BadSample, SampleRef, ShardReader, ShardSource, index_shard, iter_shard
from dist_audio.storage import DiskCache, SourceUnavailable, Store, take_retries

__all__ = ["AudioLoader", "CorruptDataError", "make_loader", "valid_crop_starts"]

log = logging.getLogger(__name__)

SPLITS = ("train", "valid")
_INDEXES_KEPT = 64  # shard indexes cached per worker
_T = TypeVar("_T")


class CorruptDataError(RuntimeError):
    """Too many bad samples in a window of the stream: training would run on little or nothing."""


def make_loader(cfg: DataConfig, split: str, rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0, *,
                start_sample: int = 0, global_batch: int | None = None) -> AudioLoader:
    """The batches of ``split`` ("train" or "valid") for one rank; ``len()`` is equal on every rank.

    Autoregressive batches: ``x``, ``y`` Long[B, L] (``x`` = ``y`` shifted right, first token the zero
    level), ``keys``, ``skipped``. Separation batches: ``mixture`` Float[B, C, T], ``stems`` Float[B, S, C, T],
    ``keys``, ``skipped``, ``remote_retries``. Validation batches also carry ``mask`` Bool[B] (False = padding).

    train: ``global_batch`` (default ``batch_size × world_size``) samples per optimizer step, starting at
    epoch position ``start_sample``.
    valid: always from the start, ``batch_size`` crops per batch and rank (``global_batch`` does not apply).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    data = _Data.from_manifest(cfg, split)
    if split == "valid":
        if start_sample:
            raise ValueError("validation always starts at its beginning: start_sample must be 0")
        return AudioLoader(_ValidPlan.make(data, rank, world_size))
    size = global_batch if global_batch is not None else cfg.batch_size * world_size
    if start_sample < 0:
        raise ValueError(f"start_sample must be >= 0, got {start_sample}")
    return AudioLoader(_TrainPlan.make(data, rank, world_size, seed, epoch, start_sample, size))


# --------------------------------------------------------------------------------------------------
# plans: what this rank's loader yields, computed from the manifest alone
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shard:
    path: str
    samples: int
    short_chunks: tuple[int, ...]  # frames of the chunks shorter than the manifest's chunk_frames


@dataclass(frozen=True)
class _Data:
    """What both splits read: the split's shards and how a crop is cut from them."""

    cfg: DataConfig
    split: str
    shards: tuple[_Shard, ...]
    signal: str  # the audio member the autoregressive task reads: "audio" (files) or "mixture" (musdb)
    channels: int
    chunk_frames: int
    segment: int  # frames per crop
    source: ShardSource  # opens the shards (a local directory or a URL, with its cache)

    @classmethod
    def from_manifest(cls, cfg: DataConfig, split: str) -> _Data:
        try:
            store = Store(cfg.shards, cfg.remote_timeout_s)
        except ValueError as err:
            raise ConfigError("data.shards", str(err)) from None
        root = store.url
        manifest = read_manifest(store)
        version = hashlib.sha1(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
        cache = DiskCache(cfg.cache_dir, int(cfg.cache_max_gib * 2**30)) if cfg.cache_dir else None
        layout = manifest.get("layout")
        channels = int(manifest["channels"])
        if cfg.task == "separation":
            if layout != "musdb":
                raise ConfigError("data.shards", "separation needs stem shards (data_prep.shard --layout musdb)")
            missing = [s for s in cfg.sources if s not in manifest.get("stems", [])]
            if missing:
                raise ConfigError("data.sources", f"{missing} not among the shards' stems {manifest.get('stems')}")
        if cfg.interleave_stereo and channels != 2:
            raise ConfigError("data.interleave_stereo", f"needs stereo shards; {root} holds {channels}-channel audio")
        entry = manifest["splits"].get(split) or {}
        if not entry.get("samples"):
            raise ConfigError("data.shards", f"{root} has no {split} samples")
        shards = tuple(_Shard(store.path(name), int(n), tuple(short)) for name, n, short in
                       zip(entry["shards"], entry["shard_samples"], entry["shard_short_chunks"]))
        return cls(cfg, split, shards, "audio" if layout == "files" else "mixture", channels,
                   int(manifest["chunk_frames"]), round(cfg.segment_seconds * manifest["sample_rate"]),
                   ShardSource(store, cache, version))


@dataclass(frozen=True)
class _TrainPlan:
    data: _Data
    rank: int
    world_size: int
    seed: int
    epoch: int
    start_sample: int
    global_batch: int
    steps: int  # whole global batches from start_sample to the end of the epoch

    @classmethod
    def make(cls, data: _Data, rank: int, world_size: int, seed: int, epoch: int, start_sample: int,
             global_batch: int) -> _TrainPlan:
        batch_size = data.cfg.batch_size
        if global_batch <= 0 or global_batch % world_size or (global_batch // world_size) % batch_size:
            raise ConfigError("data.batch_size", f"a global batch of {global_batch} samples does not split into "
                                                 f"{world_size} rank(s) × whole micro-batches of {batch_size}")
        samples = sum(shard.samples for shard in data.shards)
        if global_batch > samples:
            raise ConfigError("data.batch_size", f"a global batch of {global_batch} samples is more than the "
                                                 f"{samples} training samples in {data.cfg.shards}")
        steps = max(0, (samples - start_sample) // global_batch)
        return cls(data, rank, world_size, seed, epoch, start_sample, global_batch, steps)

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch // self.world_size // self.data.cfg.batch_size

    @property
    def batches(self) -> int:
        return self.steps * self.micro_batches_per_step

    def first_position(self, batch: int) -> int:
        """The epoch position of the first sample of this rank's micro-batch ``batch``."""
        step, micro = divmod(batch, self.micro_batches_per_step)
        return (self.start_sample + step * self.global_batch + self.rank * (self.global_batch // self.world_size)
                + micro * self.data.cfg.batch_size)


@dataclass(frozen=True)
class _ValidPlan:
    data: _Data
    rank: int
    world_size: int
    batches: int  # per rank

    @classmethod
    def make(cls, data: _Data, rank: int, world_size: int) -> _ValidPlan:
        crops = sum(_crop_count(shard, data.chunk_frames, data.segment) for shard in data.shards)
        return cls(data, rank, world_size, math.ceil(math.ceil(crops / data.cfg.batch_size) / world_size))

    @property
    def steps(self) -> int:
        return self.batches


def valid_crop_starts(frames: int, segment: int) -> list[int]:
    """Fixed crops covering a chunk: every ``segment`` frames, the last one aligned to the chunk's end."""
    if frames <= segment:
        return [0]
    return [*range(0, frames - segment, segment), frames - segment]


def _crop_count(shard: _Shard, chunk_frames: int, segment: int) -> int:
    full = shard.samples - len(shard.short_chunks)
    return full * len(valid_crop_starts(chunk_frames, segment)) + sum(
        len(valid_crop_starts(f, segment)) for f in shard.short_chunks)


# --------------------------------------------------------------------------------------------------
# the loader object
# --------------------------------------------------------------------------------------------------


class AudioLoader:
    """Iterable of batch dicts for one rank and epoch; ``len()`` = micro-batches it yields, ``steps`` =
    optimizer steps' worth of them (train: ``len() / steps`` micro-batches per step; valid: one each)."""

    def __init__(self, plan: _TrainPlan | _ValidPlan):
        self.plan = plan

    def __len__(self) -> int:
        return self.plan.batches

    @property
    def steps(self) -> int:
        return self.plan.steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        workers = self.plan.data.cfg.num_workers
        if workers == 0:
            yield from _worker_batches(self.plan, 0, 1)
            return
        loader = DataLoader(_Workers(self.plan), batch_size=None, num_workers=workers,
                            worker_init_fn=_worker_init, persistent_workers=False)
        batches = iter(loader)
        try:
            yield from batches
        except SourceUnavailable as err:  # re-raised from a worker with its traceback as the message
            raise SourceUnavailable(str(err).rstrip().splitlines()[-1].split("SourceUnavailable: ", 1)[-1]) from None
        finally:
            # On an error or an early stop, end the workers now: a traceback that still references the
            # iterator would otherwise keep them alive, and every later write in this process would pay
            # for copy-on-write pages shared with them.
            batches._shutdown_workers()


class _Workers(IterableDataset):
    def __init__(self, plan: _TrainPlan | _ValidPlan):
        self.plan = plan

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        return _worker_batches(self.plan, info.id, info.num_workers)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is the work here; BLAS threads would only contend


def _worker_batches(plan: _TrainPlan | _ValidPlan, worker: int, workers: int) -> Iterator[dict[str, Any]]:
    """The micro-batches ``i ≡ worker (mod workers)`` of this loader, in order."""
    with _Reader(plan.data) as reader:
        if isinstance(plan, _ValidPlan):
            yield from _valid_batches(plan, worker, workers, reader)
        else:
            maker = _TrainExamples(plan, reader)
            for index in range(worker, plan.batches, workers):
                first = plan.first_position(index)
                examples = [maker.example(p) for p in range(first, first + plan.data.cfg.batch_size)]
                yield reader.collate(examples, with_mask=False)


def _valid_batches(plan: _ValidPlan, worker: int, workers: int, reader: _Reader) -> Iterator[dict[str, Any]]:
    """Every worker walks all crops in manifest order, grouped into global batches; global batch ``g`` is
    batch ``g // world`` of rank ``g % world``, made by that rank's worker ``(g // world) % workers``. So each
    crop is decoded exactly once, and the batches do not depend on ``num_workers``. A bad crop becomes a
    padding row; batches past the last crop are all padding."""
    data, world = plan.data, plan.world_size
    reporter = plan.rank == 0 and worker == 0  # unreadable shard parts are seen by all; counted once
    crops = _valid_crops(plan, reader.counter if reporter else None)
    for index in range(plan.batches * world):
        batch = list(itertools.islice(crops, data.cfg.batch_size))
        rank, local = index % world, index // world
        if rank != plan.rank or local % workers != worker:
            continue
        examples = []
        for ref, start in batch:
            try:
                examples.append(reader.example(ref, start))
                reader.counter.good()
            except ValueError as err:
                reader.counter.record(ref.shard, str(err))
                examples.append(None)
        yield reader.collate(examples, with_mask=True)


def _valid_crops(plan: _ValidPlan, counter: _BadCounter | None) -> Iterator[tuple[SampleRef, int]]:
    for shard in plan.data.shards:
        for item in iter_shard(shard.path, shard.samples, plan.data.source):
            if isinstance(item, SampleRef):
                yield from ((item, start) for start in valid_crop_starts(item.frames, plan.data.segment))
            elif counter is not None:
                counter.record(item.shard, item.reason, item.count)


# --------------------------------------------------------------------------------------------------
# samples → examples → batches
# --------------------------------------------------------------------------------------------------


class _BadCounter:
    """Counts bad samples, warns naming the shard, and stops when a window holds too many."""

    def __init__(self, max_fraction: float, window: int):
        self.max_fraction, self.window = max_fraction, window
        self.seen = self.bad = self.pending = 0
        self.shards: dict[str, int] = {}
        self.warned: set[tuple[str, str]] = set()

    def good(self) -> None:
        self._advance(1)

    def record(self, shard: str, reason: str, count: int = 1) -> None:
        if (shard, reason) not in self.warned:  # a lost shard tail is one reason for many samples: warn once
            self.warned.add((shard, reason))
            log.warning("skipping %d bad sample(s) in %s: %s", count, shard, reason)
        name = os.path.basename(shard)
        self.pending += count
        self.bad += count
        self.shards[name] = self.shards.get(name, 0) + count
        if self.max_fraction < 1.0 and self.bad > self.max_fraction * self.window:
            names = ", ".join(f"{name} ({n})" for name, n in sorted(self.shards.items()))
            raise CorruptDataError(
                f"{self.bad} bad samples within a window of {self.window} exceed data.max_bad_fraction="
                f"{self.max_fraction}; bad samples per shard: {names}. Check or re-create these shards "
                "(python -m data_prep.verify), or raise data.max_bad_fraction.")
        self._advance(count)

    def take_skipped(self) -> int:
        pending, self.pending = self.pending, 0
        return pending

    def _advance(self, n: int) -> None:
        self.seen += n
        if self.seen >= self.window:
            self.seen = self.bad = 0
            self.shards = {}


class _Reader:
    """One worker's reading state: open shard files, shard indexes, the bad-sample counter; decodes crops
    into examples and stacks examples into batches."""

    def __init__(self, data: _Data):
        self.data, self.cfg = data, data.cfg
        self.shards = ShardReader(source=data.source)
        self.counter = _BadCounter(self.cfg.max_bad_fraction, self.cfg.bad_window)
        self._indexes: OrderedDict[int, list[SampleRef | BadSample]] = OrderedDict()
        if self.cfg.task == "autoregressive":
            # quantization by table: levels of every 16-bit value (or mean of two, for stereo folded to mono)
            self.fold = 1 if self.cfg.interleave_stereo else data.channels
            self.levels = pcm16_table(self.cfg.bits, self.cfg.quantization, self.fold)
            self.zero = zero_level(self.cfg.bits, self.cfg.quantization)

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *_: object) -> None:
        self.shards.close()

    def sample(self, shard: int, index: int) -> SampleRef | BadSample:
        """Sample ``index`` of the split's shard number ``shard`` (indexes cached, least recently used dropped)."""
        if shard in self._indexes:
            self._indexes.move_to_end(shard)
        else:
            if len(self._indexes) >= _INDEXES_KEPT:
                self._indexes.popitem(last=False)
            entry = self.data.shards[shard]
            self._indexes[shard] = index_shard(entry.path, entry.samples, self.data.source)
        return self._indexes[shard][index]

    def example(self, ref: SampleRef, start: int) -> dict[str, Any]:
        """One crop: its token ``levels`` (small unsigned ints), or ``mixture`` and ``stems`` as stored."""
        segment = self.data.segment
        if self.cfg.task == "autoregressive":
            pcm = self.shards.read_crop(ref, self.data.signal, start, segment, dtype="int16")
            if self.fold == 1:  # mono, or stereo interleaved: the frame-major memory is already L R L R
                codes = pcm.T.reshape(-1).view(np.uint16)
            else:
                codes = (pcm[0].astype(np.int32) + pcm[1]) & (65536 * self.fold - 1)
            return {"levels": np.take(self.levels, codes), "key": f"{ref.key}@{start}"}  # while the crop is in cache
        signals = [self.shards.read_crop(ref, s, start, segment) for s in ("mixture", *self.cfg.sources)]
        return {"mixture": torch.from_numpy(signals[0]), "stems": torch.from_numpy(np.stack(signals[1:])),
                "key": f"{ref.key}@{start}"}

    def padding(self) -> dict[str, Any]:
        if self.cfg.task == "autoregressive":  # silence: the zero level
            length = self.data.segment * (2 if self.cfg.interleave_stereo else 1)
            return {"levels": np.full(length, self.zero, self.levels.dtype), "key": ""}
        shape = (self.data.channels, self.data.segment)
        return {"mixture": torch.zeros(shape), "stems": torch.zeros(len(self.cfg.sources), *shape), "key": ""}

    def collate(self, examples: list[dict[str, Any] | None], with_mask: bool) -> dict[str, Any]:
        """Stack examples into a batch; ``None`` entries and missing rows become padding (mask False)."""
        examples = examples + [None] * (self.cfg.batch_size - len(examples))
        rows = [self.padding() if e is None else e for e in examples]
        if self.cfg.task == "autoregressive":
            # small levels widened to Long straight into x and y: few large temporaries
            levels = torch.from_numpy(np.stack([row["levels"] for row in rows]))
            y = levels.long()
            x = torch.empty_like(y)
            x[:, 0] = self.zero
            x[:, 1:] = levels[:, :-1]
            batch: dict[str, Any] = {"x": x, "y": y}
        else:
            batch = {name: torch.stack([row[name] for row in rows]) for name in ("mixture", "stems")}
        batch["keys"] = [row["key"] for row in rows]
        batch["skipped"] = torch.tensor(self.counter.take_skipped(), dtype=torch.long)
        batch["remote_retries"] = torch.tensor(take_retries(), dtype=torch.long)
        if with_mask:
            batch["mask"] = torch.tensor([e is not None for e in examples])
        return batch


class _TrainExamples:
    """The example at any epoch position, computed from scratch (crop offsets and remix draws by counter)."""

    def __init__(self, plan: _TrainPlan, reader: _Reader):
        self.plan, self.cfg, self.reader = plan, plan.data.cfg, reader
        sizes = [shard.samples for shard in plan.data.shards]
        self.remix = self.cfg.task == "separation" and self.cfg.remix
        streams = range(1, len(self.cfg.sources) + 1) if self.remix else [0]
        self.orders = {s: EpochOrder(sizes, self.cfg.shuffle_buffer, plan.seed, plan.epoch, s) for s in streams}

    def example(self, position: int) -> dict[str, Any]:
        if not self.remix:
            return self._first_usable(0, position, self.reader.example)
        low, high = self.cfg.remix_gain
        seed, epoch = self.plan.seed, self.plan.epoch
        stems, keys = [], []
        for stream, stem in enumerate(self.cfg.sources, start=1):  # stem s from its own order
            audio, key = self._first_usable(stream, position, functools.partial(self._stem_crop, stem))
            gain = low + (high - low) * counter_uniform(seed, epoch, stream, position, 1)
            swap, flip = (counter_uniform(seed, epoch, stream, position, k) < 0.5 for k in (2, 3))
            audio = audio[::-1] if swap else audio
            stems.append(torch.from_numpy(np.ascontiguousarray(audio)) * (-gain if flip else gain))
            keys.append(key)
        stacked = torch.stack(stems)
        return {"mixture": stacked.sum(dim=0), "stems": stacked, "key": "+".join(keys)}

    def _stem_crop(self, stem: str, ref: SampleRef, start: int) -> tuple[np.ndarray, str]:
        return self.reader.shards.read_crop(ref, stem, start, self.plan.data.segment), f"{ref.key}@{start}"

    def _first_usable(self, stream: int, position: int, decode: Callable[[SampleRef, int], _T]) -> _T:
        """``decode(sample, crop start)`` at ``position`` of ``stream``'s order; if that sample is unusable
        (bad in its shard, or ``decode`` raises ``ValueError``), the next usable one of the order (wrapping),
        cropped with this position's draw. Only the position's own unusable sample is counted as skipped."""
        order, counter, segment = self.orders[stream], self.reader.counter, self.plan.data.segment
        draw = counter_uniform(self.plan.seed, self.plan.epoch, stream, position, 0)
        for step in range(len(order)):
            item = self.reader.sample(*order[(position + step) % len(order)])
            if isinstance(item, SampleRef):
                start = int(draw * (max(item.frames - segment, 0) + 1))
                try:
                    result = decode(item, start)
                except ValueError as err:
                    item = BadSample(item.shard, str(err))
                else:
                    if step == 0:
                        counter.good()
                    return result
            if step == 0:
                counter.record(item.shard, item.reason)
        names = ", ".join(os.path.basename(s.path) for s in self.plan.data.shards)
        raise CorruptDataError(f"no usable sample in the training shards {names}")
