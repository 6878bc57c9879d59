"""Per-rank streaming batches from ``data_prep.shard`` output: a plain function of
(config, split, rank, world size, seed, epoch).

How an epoch is laid out (every rank computes the same plan from the manifest, so no communication):

- The rank's batches come from ``S = max(1, num_workers)`` *streams*; stream ``w`` produces global batch
  indices ``b ≡ w (mod S)``. A torch ``DataLoader`` over an ``IterableDataset`` with ``batch_size=None``
  asks its workers round-robin, so batch order is fixed: worker ``i`` runs stream ``(i + start_batch) % S``.
- train: shards are assigned to the ``world_size × S`` streams *after* a shuffle seeded by (seed, epoch),
  so every epoch sees a new order and no two streams read the same shard (when there are enough shards;
  with fewer, streams share shards). Each stream cycles over its shards (reshuffled each pass) through a
  sample shuffle buffer until it has made its batches; every rank makes exactly ``epoch_batches``
  batches (default: train samples // (batch size × world size)), so DDP/ZeRO/FSDP never wait at the
  epoch end for a rank that ran dry. Crops start at random offsets.
- valid: no shuffling; every chunk is cut into fixed crops ``0, seg, 2·seg, …`` with the last one aligned
  to the chunk's end. Every stream walks all crops in manifest order (headers only: validation sets
  are small) and decodes only the batches it owns, so each crop is produced exactly once across ranks
  and workers however few shards there are, and the batches do not depend on ``num_workers``. The last
  batches carry padding rows (``mask`` False) so all ranks yield the same count.
- ``start_batch=k`` yields exactly the batches ``k, k+1, …`` of the same epoch: the skipped batches are
  planned (same random numbers, same shard walk) but their audio is not decoded.

We read tar files with ``tarfile`` rather than ``webdataset`` because we need exact control over which
stream reads which shard and which sample (WebDataset 1.0.2 needs a hand-written node splitter and its
default decoders will unpickle ``.pyd`` members), random access into a member so a crop decodes only its
own bytes, and a count of every skipped sample. See ``dist_audio.data.shards`` for the reading itself.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_audio.config import ConfigError, DataConfig, read_manifest
from dist_audio.data.quantize import quantize, zero_level
from dist_audio.data.shards import BadSample, SampleRef, ShardReader, iter_shard

__all__ = ["AudioLoader", "CorruptDataError", "make_loader", "valid_crop_starts"]

log = logging.getLogger(__name__)

SPLITS = ("train", "valid")


class CorruptDataError(RuntimeError):
    """Too many bad samples in a window of the stream: training would run on little or nothing."""


def make_loader(cfg: DataConfig, split: str, rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0,
                start_batch: int = 0) -> AudioLoader:
    """The batches of ``split`` ("train" or "valid") for one rank; ``len()`` is equal on every rank.

    Autoregressive batches: ``x``, ``y`` Long[B, L] (``x`` = ``y`` shifted right, first token the zero
    level), ``keys``, ``skipped``. Separation batches: ``mixture`` Float[B, C, T], ``stems`` Float[B, S, C, T],
    ``keys``, ``skipped``. Validation batches also carry ``mask`` Bool[B] (False = padding).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    return AudioLoader(_make_plan(cfg, split, rank, world_size, seed, epoch, start_batch))


# --------------------------------------------------------------------------------------------------
# the plan: which stream reads which shards and makes how many batches
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shard:
    path: str
    samples: int
    short_chunks: tuple[int, ...]  # frames of the chunks shorter than the manifest's chunk_frames


@dataclass(frozen=True)
class _Plan:
    cfg: DataConfig
    split: str
    rank: int
    world_size: int
    seed: int
    epoch: int
    start_batch: int
    signal: str  # the audio member the autoregressive task reads: "audio" (files) or "mixture" (musdb)
    channels: int
    chunk_frames: int
    segment: int  # frames per crop
    streams: int
    stream_shards: tuple[tuple[_Shard, ...], ...]  # per stream of this rank (valid: all the rank's shards)
    stream_batches: tuple[int, ...]  # per stream of this rank (train)
    batches: int  # per rank, from batch 0

    def first_batches_to_skip(self, stream: int) -> int:
        """How many of ``stream``'s batches come before ``start_batch`` (batches b ≡ stream mod S)."""
        return max(0, -(-(self.start_batch - stream) // self.streams))


def _make_plan(cfg: DataConfig, split: str, rank: int, world_size: int, seed: int, epoch: int,
               start_batch: int) -> _Plan:
    root = Path(cfg.shards)
    manifest = read_manifest(root)
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
    shards = [_Shard(str(root / name), int(n), tuple(short)) for name, n, short in
              zip(entry["shards"], entry["shard_samples"], entry["shard_short_chunks"])]
    segment = round(cfg.segment_seconds * manifest["sample_rate"])
    chunk_frames = int(manifest["chunk_frames"])
    streams = max(1, cfg.num_workers)
    slots = world_size * streams

    if split == "train":
        order = np.random.default_rng([seed, epoch]).permutation(len(shards))
        shuffled = [shards[i] for i in order]
        assigned = [tuple(shuffled[s::slots]) or (shuffled[s % len(shuffled)],) for s in range(slots)]
        batches = cfg.epoch_batches or max(1, entry["samples"] // (cfg.batch_size * world_size))
        mine = assigned[rank * streams : (rank + 1) * streams]
    else:  # every stream walks all crops; global batch g belongs to rank g % world_size
        crops = sum(_crop_count(shard, chunk_frames, segment) for shard in shards)
        batches = math.ceil(math.ceil(crops / cfg.batch_size) / world_size)
        mine = (tuple(shards),) * streams
    per_stream = tuple(max(0, -(-(batches - w) // streams)) for w in range(streams))
    return _Plan(cfg, split, rank, world_size, seed, epoch, start_batch, "audio" if layout == "files" else "mixture",
                 channels, chunk_frames, segment, streams, tuple(mine), per_stream, batches)


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
    """Iterable of batch dicts for one rank and epoch; ``len()`` = batches it yields."""

    def __init__(self, plan: _Plan):
        self.plan = plan

    def __len__(self) -> int:
        return max(0, self.plan.batches - self.plan.start_batch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        workers = self.plan.cfg.num_workers
        if workers == 0:
            yield from _stream_batches(self.plan, 0)
            return
        loader = DataLoader(_Streams(self.plan), batch_size=None, num_workers=workers,
                            worker_init_fn=_worker_init, persistent_workers=False)
        batches = iter(loader)
        try:
            yield from batches
        finally:
            # On an error or an early stop, end the workers now: a traceback that still references the
            # iterator would otherwise keep them alive, and every later write in this process would pay
            # for copy-on-write pages shared with them.
            batches._shutdown_workers()


class _Streams(IterableDataset):
    def __init__(self, plan: _Plan):
        self.plan = plan

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return iter(_stream_batches(self.plan, (worker + self.plan.start_batch) % self.plan.streams))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is the work here; BLAS threads would only contend


def _stream_batches(plan: _Plan, stream: int) -> Iterator[dict[str, Any]]:
    """The batches ``b ≡ stream (mod S)``, ``b >= start_batch``, of this rank's epoch."""
    cfg = plan.cfg
    counter = _BadCounter(cfg.max_bad_fraction, cfg.bad_window)
    with ShardReader() as reader:
        maker = _ExampleMaker(plan, reader)
        if plan.split == "valid":
            yield from _valid_batches(plan, stream, counter, maker)
        else:
            yield from _train_batches(plan, stream, counter, maker)


def _train_batches(plan: _Plan, stream: int, counter: _BadCounter, maker: _ExampleMaker) -> Iterator[dict[str, Any]]:
    """Train batches of one stream; those before ``start_batch`` are planned but not decoded."""
    cfg = plan.cfg
    rng = np.random.default_rng([plan.seed, plan.epoch, plan.rank, stream])
    source = _TrainSource(plan, plan.stream_shards[stream], rng, counter, maker)
    skip = plan.first_batches_to_skip(stream)
    for index in range(plan.stream_batches[stream]):
        decode = index >= skip
        examples = [source.next_example(decode) for _ in range(cfg.batch_size)]
        skipped = counter.take_skipped()
        if decode:
            yield maker.collate(examples, skipped, with_mask=False)


def _valid_batches(plan: _Plan, stream: int, counter: _BadCounter, maker: _ExampleMaker) -> Iterator[dict[str, Any]]:
    """Every stream walks all crops in manifest order, grouped into global batches; global batch ``g`` is
    batch ``g // world`` of rank ``g % world``, made by that rank's stream ``(g // world) % S``. So each crop
    is decoded exactly once, and the batches do not depend on ``num_workers``. A bad crop becomes a
    padding row; batches past the last crop are all padding."""
    make = maker.tokens if plan.cfg.task == "autoregressive" else maker.stems
    world = plan.world_size
    reporter = plan.rank == 0 and stream == 0  # unreadable shard parts are seen by all; counted once
    crops = _valid_crops(plan, counter if reporter else None)
    for index in range(plan.batches * world):
        batch = list(itertools.islice(crops, plan.cfg.batch_size))
        rank, local = index % world, index // world
        if rank != plan.rank or local % plan.streams != stream or local < plan.start_batch:
            continue
        examples = []
        for ref, start in batch:
            try:
                examples.append(make(ref, start, True))
                counter.good()
            except ValueError as err:
                counter.record(BadSample(ref.shard, str(err)))
                examples.append(None)
        yield maker.collate(examples, counter.take_skipped(), with_mask=True)


def _valid_crops(plan: _Plan, counter: _BadCounter | None) -> Iterator[tuple[SampleRef, int]]:
    for shard in plan.stream_shards[0]:
        for item in iter_shard(shard.path, shard.samples):
            if isinstance(item, SampleRef):
                yield from ((item, start) for start in valid_crop_starts(item.frames, plan.segment))
            elif counter is not None:
                counter.record(item)


# --------------------------------------------------------------------------------------------------
# samples → examples
# --------------------------------------------------------------------------------------------------


class _BadCounter:
    """Counts bad samples, warns naming the shard, and stops when a window holds too many."""

    def __init__(self, max_fraction: float, window: int):
        self.max_fraction, self.window = max_fraction, window
        self.seen = self.bad = self.pending = 0
        self.shards: dict[str, int] = {}

    def good(self) -> None:
        self._advance(1)

    def record(self, sample: BadSample) -> None:
        log.warning("skipping %d bad sample(s) in %s: %s", sample.count, sample.shard, sample.reason)
        self.pending += sample.count
        self.bad += sample.count
        self.shards[os.path.basename(sample.shard)] = self.shards.get(os.path.basename(sample.shard), 0) + sample.count
        if self.max_fraction < 1.0 and self.bad > self.max_fraction * self.window:
            names = ", ".join(f"{name} ({n})" for name, n in sorted(self.shards.items()))
            raise CorruptDataError(
                f"{self.bad} bad samples within a window of {self.window} exceed data.max_bad_fraction="
                f"{self.max_fraction}; bad samples per shard: {names}. Check or re-create these shards "
                "(python -m data_prep.verify), or raise data.max_bad_fraction.")
        self._advance(sample.count)

    def take_skipped(self) -> int:
        pending, self.pending = self.pending, 0
        return pending

    def _advance(self, n: int) -> None:
        self.seen += n
        if self.seen >= self.window:
            self.seen = self.bad = 0
            self.shards = {}


_SKIPPED = object()  # stands for an example that was planned but not decoded (before start_batch)


class _ExampleMaker:
    """Decodes crops into task examples and stacks examples into batches."""

    def __init__(self, plan: _Plan, reader: ShardReader):
        self.plan, self.cfg, self.reader = plan, plan.cfg, reader
        self.zero = zero_level(self.cfg.bits, self.cfg.quantization)

    def tokens(self, ref: SampleRef, start: int, decode: bool) -> Any:
        """The crop as one float sequence (mono, or L R L R … interleaved); ``collate`` quantizes the batch."""
        audio = self.reader.read_crop(ref, self.plan.signal, start, self.plan.segment, probe_only=not decode)
        if not decode:
            return _SKIPPED
        if self.cfg.interleave_stereo:
            wave = audio.T.reshape(-1)
        else:
            wave = sum(audio) / audio.shape[0]  # channel by channel: numpy's mean over this view is 25× slower
        return {"wave": torch.from_numpy(np.ascontiguousarray(wave)), "key": f"{ref.key}@{start}"}

    def stems(self, ref: SampleRef, start: int, decode: bool) -> Any:
        """Mixture and stems of one chunk at one offset, as stored (no augmentation)."""
        signals = [self.reader.read_crop(ref, s, start, self.plan.segment, probe_only=not decode)
                   for s in ("mixture", *self.cfg.sources)]
        if not decode:
            return _SKIPPED
        return {"mixture": torch.from_numpy(signals[0]), "stems": torch.from_numpy(np.stack(signals[1:])),
                "key": f"{ref.key}@{start}"}

    def padding(self) -> dict[str, Any]:
        if self.cfg.task == "autoregressive":  # silence: quantizes to the zero level
            return {"wave": torch.zeros(self.plan.segment * (2 if self.cfg.interleave_stereo else 1)), "key": ""}
        shape = (self.plan.channels, self.plan.segment)
        return {"mixture": torch.zeros(shape), "stems": torch.zeros(len(self.cfg.sources), *shape), "key": ""}

    def collate(self, examples: list[dict[str, Any] | None], skipped: int, with_mask: bool) -> dict[str, Any]:
        """Stack examples into a batch; ``None`` entries and missing rows become padding (mask False)."""
        examples = examples + [None] * (self.cfg.batch_size - len(examples))
        rows = [self.padding() if e is None else e for e in examples]
        if self.cfg.task == "autoregressive":
            # one quantization per batch, and x built in place: fewer large temporaries than per example
            y = quantize(torch.stack([row["wave"] for row in rows]), self.cfg.bits, self.cfg.quantization)
            x = torch.empty_like(y)
            x[:, 0] = self.zero
            x[:, 1:] = y[:, :-1]
            batch: dict[str, Any] = {"x": x, "y": y}
        else:
            batch = {name: torch.stack([row[name] for row in rows]) for name in ("mixture", "stems")}
        batch["keys"] = [row["key"] for row in rows]
        batch["skipped"] = torch.tensor(skipped, dtype=torch.long)
        if with_mask:
            batch["mask"] = torch.tensor([e is not None for e in examples])
        return batch


class _TrainSource:
    """Endless shuffled samples of one stream's shards, cut at random offsets (with remix for separation)."""

    def __init__(self, plan: _Plan, shards: tuple[_Shard, ...], rng: np.random.Generator, counter: _BadCounter,
                 maker: _ExampleMaker):
        self.plan, self.cfg, self.rng, self.counter, self.maker = plan, plan.cfg, rng, counter, maker
        self.refs = _shuffle_buffer(self._passes(shards), self.cfg.shuffle_buffer, rng)

    def _passes(self, shards: tuple[_Shard, ...]) -> Iterator[SampleRef]:
        # Each shard's tar headers are walked once per stream; later passes replay the parsed index (bad
        # samples included, so they are counted again on every pass exactly as a fresh walk would count them).
        index_of: dict[int, list[SampleRef | BadSample]] = {}
        while True:
            found = 0
            for index in self.rng.permutation(len(shards)):
                if index not in index_of:
                    index_of[index] = list(iter_shard(shards[index].path, shards[index].samples))
                for item in index_of[index]:
                    if isinstance(item, BadSample):
                        self.counter.record(item)
                        continue
                    found += 1
                    yield item
            if found == 0:
                names = ", ".join(os.path.basename(s.path) for s in shards)
                raise CorruptDataError(f"no readable sample in shard(s) {names}")

    def next_example(self, decode: bool) -> Any:
        if self.cfg.task == "separation" and self.cfg.remix:
            return self._remixed(decode)
        make = self.maker.tokens if self.cfg.task == "autoregressive" else self.maker.stems
        while True:
            ref = next(self.refs)
            start = self._random_start(ref)
            try:
                example = make(ref, start, decode)
            except ValueError as err:
                self.counter.record(BadSample(ref.shard, str(err)))
                continue
            self.counter.good()
            return example

    def _remixed(self, decode: bool) -> Any:
        """Each stem from its own chunk, with random gain, channel swap and sign flip; mixture = sum."""
        low, high = self.cfg.remix_gain
        stems, keys = [], []
        for stem in self.cfg.sources:
            while True:
                ref = next(self.refs)
                start = self._random_start(ref)
                gain, swap, flip = self.rng.uniform(low, high), self.rng.random() < 0.5, self.rng.random() < 0.5
                try:
                    audio = self.maker.reader.read_crop(ref, stem, start, self.plan.segment, probe_only=not decode)
                except ValueError as err:
                    self.counter.record(BadSample(ref.shard, str(err)))
                    continue
                self.counter.good()
                break
            if decode:
                audio = audio[::-1] if swap else audio
                stems.append(torch.from_numpy(np.ascontiguousarray(audio)) * (-gain if flip else gain))
                keys.append(f"{ref.key}@{start}")
        if not decode:
            return _SKIPPED
        stacked = torch.stack(stems)
        return {"mixture": stacked.sum(dim=0), "stems": stacked, "key": "+".join(keys)}

    def _random_start(self, ref: SampleRef) -> int:
        return int(self.rng.integers(0, max(ref.frames - self.plan.segment, 0) + 1))


def _shuffle_buffer(items: Iterator[SampleRef], size: int, rng: np.random.Generator) -> Iterator[SampleRef]:
    """Yield a random element of a buffer of ``size`` items, refilled from ``items`` (size 0: no shuffling)."""
    buffer: list[SampleRef] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        if size == 0:
            yield item
            continue
        index = int(rng.integers(size))
        yield buffer[index]
        buffer[index] = item
    order = rng.permutation(len(buffer))
    yield from (buffer[i] for i in order)
