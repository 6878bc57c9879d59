"""Audio files or MUSDB18-HQ folders → WebDataset tar shards plus ``manifest.json``.

    python -m data_prep.shard SRC OUT --layout files|musdb [options]

OUT is a local directory or an ``s3://`` / ``gs://`` URL (credentials and endpoint from the standard
``AWS_*`` variables or ~/.aws). For a URL each shard is built in a local temporary folder and uploaded
when complete; the manifest is uploaded last, so an interrupted upload never looks complete, and running
the same command again uploads only the shards that are not there yet.

One sample is one chunk of a track (at most ``--chunk-seconds`` long, so a training crop never has to
read a whole song): a ``<key>.json`` member with its metadata and one 16-bit audio member per signal
(``<key>.flac``, or ``<key>.mixture.flac``, ``<key>.drums.flac``, … for ``musdb``). Shards are
``<split>-NNNNNN.tar`` with split ``train`` or ``valid``.

Bad inputs are rejected with a reason (listed in the manifest and summarised at the end) and the run
goes on; ``--strict`` stops at the first one instead. Shards are written under temporary names and
renamed when complete, and the manifest is written last, so an interrupted run leaves nothing that
looks complete; running the same command again rebuilds what is missing, and on a complete OUT it does
nothing. Tracks are decoded in ``--workers`` processes but written in sorted source order, so the
output is the same for any worker count.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf
from tqdm import tqdm

from dist_audio.storage import SourceUnavailable, Store, parse_location

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "ShardError",
    "ShardOptions",
    "main",
    "parse_size",
    "shard_dataset",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
JOB_NAME = ".shard-job.json"  # identifies an unfinished OUT, so a re-run knows it may rebuild it
SHARD_NAME = re.compile(r"^(train|valid)-\d{6}\.tar$")
TEMP_NAME = re.compile(r"^\.(train|valid)-\d{6}\.tar\.tmp$")
SPLITS = ("train", "valid")
DEFAULT_STEMS = ("drums", "bass", "other", "vocals")
# Options that change how the run goes but not what it writes; ignored when comparing two runs.
_RUN_ONLY_OPTIONS = ("workers", "strict", "overwrite", "progress")


class ShardError(Exception):
    """A user-facing failure: printed as one line by the CLI, which then exits with code 1."""


@dataclass
class ShardOptions:
    """Every option of ``python -m data_prep.shard`` (the CLI flags, with the same names)."""

    layout: Literal["files", "musdb"] = "files"
    sample_rate: int | None = None  # None: the rate of the first readable input
    channels: int | None = None  # None: the channel count of the first readable input
    chunk_seconds: float = 30.0
    min_seconds: float | None = None  # shorter tails dropped, shorter tracks rejected; None: min(1, chunk_seconds)
    codec: Literal["flac", "wav"] = "flac"
    shard_size: int = 256_000_000  # bytes
    max_per_shard: int = 1000  # samples
    valid_fraction: float = 0.05  # files layout only
    stems: list[str] = field(default_factory=lambda: list(DEFAULT_STEMS))  # musdb layout only
    workers: int = 1
    strict: bool = False
    overwrite: bool = False
    progress: bool = True

    def check(self) -> None:
        _require(self.layout in ("files", "musdb"), f"--layout must be files or musdb, got {self.layout!r}")
        _require(self.codec in ("flac", "wav"), f"--codec must be flac or wav, got {self.codec!r}")
        _require(self.sample_rate is None or self.sample_rate > 0, "--sample-rate must be > 0")
        _require(self.channels in (None, 1, 2), "--channels must be 1 or 2")
        _require(self.chunk_seconds > 0, "--chunk-seconds must be > 0")
        if self.min_seconds is None:
            self.min_seconds = min(1.0, self.chunk_seconds)
        _require(0 < self.min_seconds <= self.chunk_seconds, "--min-seconds must be in (0, --chunk-seconds]")
        _require(self.shard_size > 0, "--shard-size must be > 0")
        _require(self.max_per_shard > 0, "--max-per-shard must be > 0")
        _require(0.0 <= self.valid_fraction < 1.0, "--valid-fraction must be in [0, 1)")
        _require(self.workers >= 1, "--workers must be >= 1")
        _require(len(self.stems) > 0 and len(set(self.stems)) == len(self.stems), "--stems must be unique names")
        for stem in self.stems:
            _require(re.fullmatch(r"[A-Za-z0-9_-]+", stem) is not None and stem != "mixture",
                     f"--stems: {stem!r} is not a plain name (letters, digits, _ and -, not 'mixture')")

    def identity(self) -> dict[str, Any]:
        """The options that decide the output (two runs with equal identities write the same shards)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _RUN_ONLY_OPTIONS}


# --------------------------------------------------------------------------------------------------
# the Python API
# --------------------------------------------------------------------------------------------------


def shard_dataset(src: str | Path, out: str | Path, **options: Any) -> dict[str, Any]:
    """Shard ``src`` into ``out`` and return the manifest; ``options`` are ``ShardOptions`` fields.

    Raises ``ShardError`` for user errors (no usable audio, an OUT holding other data, a rejection
    under ``strict``, disk full); partial output is removed before it is raised.
    """
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(ShardOptions)})
    _require(not unknown, f"unknown option(s): {', '.join(unknown)}")
    opts = ShardOptions(**options)
    opts.stems = list(opts.stems)
    opts.check()
    try:
        location = parse_location(str(out))
    except ValueError as err:
        raise ShardError(f"OUT {err}") from None
    src = Path(src).resolve()
    _require(src.is_dir(), f"SRC {src} is not a directory")
    identity = {"source": str(src), "options": opts.identity()}
    if location.remote:
        return _shard_to_url(src, Store(location), identity, opts)
    out = Path(out).resolve()
    _require(out != src and src not in out.parents, "OUT must not be inside SRC")

    done = _prepare_out(out, identity, opts.overwrite)
    if done is not None:
        _say(f"{out} is already complete ({_describe(done)}); nothing to do. Use --overwrite to rebuild.")
        return done

    items = _discover(src, opts)
    rate, channels = _target_format(items, opts)
    try:
        _write_json(out / JOB_NAME, identity)
        manifest = _write_shards(src, out, items, opts, rate, channels,
                                 lambda temp, name: os.replace(temp, out / name))
        _write_json(out / MANIFEST_NAME, manifest)
    except ShardError:
        _remove_our_files(out)
        raise
    except OSError as err:
        _remove_our_files(out)
        where = f" ({err.filename})" if err.filename else ""
        if err.errno == errno.ENOSPC:
            raise ShardError(f"disk full while writing shards{where}; the partial output in {out} was removed. "
                             "Free some space and run the command again.") from None
        raise ShardError(f"cannot write to {out}{where}: {err.strerror or err}; "
                         "the partial output was removed") from None
    (out / JOB_NAME).unlink(missing_ok=True)
    _report(manifest, str(out))
    return manifest


def _shard_to_url(src: Path, store: Store, identity: dict[str, Any], opts: ShardOptions) -> dict[str, Any]:
    """Build each shard in a local temporary folder, upload it once complete, and the manifest last."""
    _require(store.writable, f"OUT {store.url}: http(s) locations are read-only; shard to a local directory "
                             "or to s3:// / gs://")
    try:
        done, kept = _prepare_url(store, identity, opts.overwrite)
        if done is not None:
            _say(f"{store.url} is already complete ({_describe(done)}); nothing to do. Use --overwrite to rebuild.")
            return done
        items = _discover(src, opts)
        rate, channels = _target_format(items, opts)
        store.write(JOB_NAME, json.dumps(identity, indent=2).encode())

        def upload(temp: Path, name: str) -> None:
            if name not in kept or store.size(name) != temp.stat().st_size:  # a re-run uploads what is missing
                store.put_file(temp, name)
            temp.unlink()

        with tempfile.TemporaryDirectory(prefix="dist_audio-shard-") as staging:
            manifest = _write_shards(src, Path(staging), items, opts, rate, channels, upload)
        store.write(MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())  # the commit point
        store.delete(JOB_NAME)
    except (SourceUnavailable, OSError) as err:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise ShardError("local disk full while staging a shard for upload; free space in "
                             f"{tempfile.gettempdir()} (or set TMPDIR) and run the command again") from None
        raise ShardError(f"upload to {store.url} failed: {err}; it is incomplete (no {MANIFEST_NAME}): "
                         "run the same command again to finish it") from None
    _report(manifest, store.url)
    return manifest


def _prepare_url(store: Store, identity: dict[str, Any], overwrite: bool) -> tuple[dict[str, Any] | None, set[str]]:
    """Like ``_prepare_out`` for a URL: (the manifest if complete, else None; the shards a re-run may keep)."""
    names = set(store.list())
    previous: dict[str, Any] | None = None
    if MANIFEST_NAME in names:
        previous = _parse_json(store.read(MANIFEST_NAME))
        previous_identity = {"source": (previous or {}).get("source"),
                             "options": _identity_of((previous or {}).get("options"))}
    elif JOB_NAME in names:
        previous_identity = _parse_json(store.read(JOB_NAME)) or {}
    else:
        if names:
            raise ShardError(f"OUT {store.url} is not empty ({', '.join(sorted(names)[:3])}, ...) and was not made "
                             "by data_prep.shard; choose an empty or new prefix")
        return None, set()
    same = previous_identity == identity
    ours = {n for n in names if SHARD_NAME.match(n)}
    if same and previous is not None and not overwrite and all(
            name in names for split in previous.get("splits", {}).values() for name in split.get("shards", [])):
        return previous, ours
    if not same and not overwrite:
        raise ShardError(f"OUT {store.url} holds a different dataset ({_difference(previous_identity, identity)}); "
                         "use --overwrite to replace it, or choose another OUT")
    if same and not overwrite:
        _say(f"{store.url} holds an unfinished upload of this command; finishing it")
        return None, ours
    store.delete(MANIFEST_NAME)  # first: from here on the prefix no longer looks complete
    for name in sorted(ours | (names & {JOB_NAME})):
        store.delete(name)
    return None, set()


# --------------------------------------------------------------------------------------------------
# OUT directory states: complete, unfinished, foreign
# --------------------------------------------------------------------------------------------------


def _prepare_out(out: Path, identity: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """Return the manifest if OUT already holds exactly this dataset; otherwise make OUT ready to write."""
    if out.exists() and not out.is_dir():
        raise ShardError(f"OUT {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path, job_path = out / MANIFEST_NAME, out / JOB_NAME
    previous: dict[str, Any] | None = None
    if manifest_path.is_file():
        previous = _read_json(manifest_path)
        previous_identity = {"source": previous.get("source"), "options": _identity_of(previous.get("options"))}
    elif job_path.is_file():
        previous_identity = _read_json(job_path) or {}
    else:
        foreign = [p.name for p in out.iterdir()]
        if foreign:
            raise ShardError(f"OUT {out} is not empty ({', '.join(sorted(foreign)[:3])}, ...) and was not made by "
                             "data_prep.shard; choose an empty or new directory")
        return None

    same = previous_identity == identity
    if same and previous is not None and _complete(out, previous):
        if not overwrite:
            return previous
    elif not same and not overwrite:
        raise ShardError(f"OUT {out} holds a different dataset ({_difference(previous_identity, identity)}); "
                         "use --overwrite to replace it, or choose another OUT")
    elif same:
        _say(f"{out} holds an unfinished run of this command; rebuilding it")
    _remove_our_files(out)
    return None


def _identity_of(options: Any) -> dict[str, Any] | None:
    if not isinstance(options, dict):
        return None
    return {k: v for k, v in options.items() if k not in _RUN_ONLY_OPTIONS}


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    if old.get("source") != new.get("source"):
        return f"source {old.get('source')} instead of {new.get('source')}"
    old_opts, new_opts = old.get("options") or {}, new.get("options") or {}
    changed = [f"{k} {old_opts.get(k)!r} → {new_opts.get(k)!r}" for k in new_opts if old_opts.get(k) != new_opts.get(k)]
    return "options differ: " + ", ".join(changed) if changed else "different options"


def _complete(out: Path, manifest: dict[str, Any]) -> bool:
    splits = manifest.get("splits") or {}
    return all((out / name).is_file() for split in splits.values() for name in split.get("shards", []))


def _remove_our_files(out: Path) -> None:
    """Delete what data_prep.shard writes (shards, temp shards, manifest, job file), nothing else."""
    for path in out.iterdir():
        if path.name in (MANIFEST_NAME, JOB_NAME) or SHARD_NAME.match(path.name) or TEMP_NAME.match(path.name):
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# inputs: what to read, and reading one track
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """One track: a file (layout files) or a folder of stem files (layout musdb)."""

    source: str  # path relative to SRC, posix style
    split: str
    files: tuple[tuple[str, str], ...]  # (signal name, absolute path); signal "audio" for layout files


def _discover(src: Path, opts: ShardOptions) -> list[_Item]:
    if opts.layout == "files":
        paths = sorted(p for p in src.rglob("*") if p.is_file() and not _hidden(p.relative_to(src)))
        items = []
        for path in paths:
            rel = path.relative_to(src).as_posix()
            split = "valid" if _stable_fraction(rel) < opts.valid_fraction else "train"
            items.append(_Item(rel, split, (("audio", str(path)),)))
    else:
        roots = {"train": src / "train", "test": src / "test"}
        if not any(p.is_dir() for p in roots.values()):
            raise ShardError(f"SRC {src} has no train/ or test/ folder; --layout musdb expects "
                             "SRC/{train,test}/<track>/{mixture," + ",".join(opts.stems) + "}.wav")
        items = []
        for musdb_split, root in roots.items():
            if not root.is_dir():
                continue
            for track in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
                signals = ("mixture", *opts.stems)
                files = tuple((s, str(_stem_file(track, s))) for s in signals)
                split = "train" if musdb_split == "train" else "valid"
                items.append(_Item(track.relative_to(src).as_posix(), split, files))
    if not items:
        raise ShardError(f"SRC {src} holds no files to shard")
    return items


def _stem_file(track: Path, signal: str) -> Path:
    """``<track>/<signal>.wav``, or the same name with another audio extension if that exists."""
    wav = track / f"{signal}.wav"
    if wav.exists() or not track.is_dir():
        return wav
    others = sorted(p for p in track.glob(f"{signal}.*") if p.is_file())
    return others[0] if others else wav


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _stable_fraction(text: str) -> float:
    """A number in [0, 1) that depends only on ``text`` (not on the run, machine or Python hash seed)."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2**64


def _target_format(items: list[_Item], opts: ShardOptions) -> tuple[int, int]:
    """The output sample rate and channels: the options, or else those of the first readable input."""
    rate, channels = opts.sample_rate, opts.channels
    for item in items:
        if rate is not None and channels is not None:
            break
        try:
            info = sf.info(item.files[0][1])
        except (sf.LibsndfileError, RuntimeError, OSError):
            continue
        if info.frames > 0:
            rate = rate or info.samplerate
            channels = channels or min(info.channels, 2)
    if rate is None or channels is None:
        raise ShardError("no usable audio in SRC: libsndfile cannot read any of its files")
    return rate, channels


class _Rejected(Exception):
    """An input that cannot be used; the message is the reason written into the manifest."""


def _read_track(path: str) -> tuple[np.ndarray, int]:
    """Decode a whole file as float32 [frames, channels], or raise ``_Rejected`` saying what is wrong."""
    if not os.path.exists(path):
        raise _Rejected(f"missing file {Path(path).name}")
    if os.path.getsize(path) == 0:
        raise _Rejected(f"zero-length: {Path(path).name} is an empty file")
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise _Rejected(f"not audio: libsndfile cannot read {Path(path).name} ({_sf_reason(err)})") from None
    if info.frames <= 0:
        raise _Rejected(f"zero-length: {Path(path).name} holds no audio frames")
    declared = re.search(r"^data : (\d+) \(should be (\d+)\)", info.extra_info, re.MULTILINE)
    if declared and int(declared.group(1)) > int(declared.group(2)):
        raise _Rejected(f"truncated: the header of {Path(path).name} declares {declared.group(1)} bytes of "
                        f"audio but the file holds {declared.group(2)}")
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise _Rejected(f"truncated or corrupt: decoding {Path(path).name} failed ({_sf_reason(err)})") from None
    if len(data) == 0:
        raise _Rejected(f"zero-length: {Path(path).name} holds no audio frames")
    if info.format != "MP3" and len(data) < info.frames:  # MP3 frame counts are estimates
        raise _Rejected(f"truncated: {Path(path).name} declares {info.frames} frames but holds {len(data)}")
    return data, rate


def _sf_reason(err: Exception) -> str:
    text = str(err)
    return text.split(": ", 1)[-1].strip() if text.startswith("Error") else text.strip()


def _convert(data: np.ndarray, rate: int, target_rate: int, target_channels: int, name: str) -> np.ndarray:
    """Resample and mix to the target format; float32 [frames, channels]."""
    if data.shape[1] != target_channels:
        if target_channels == 1:
            data = data.mean(axis=1, keepdims=True)
        elif data.shape[1] == 1:
            data = np.repeat(data, 2, axis=1)
        else:
            raise _Rejected(f"{name} has {data.shape[1]} channels; only mono or stereo can become stereo")
    if rate != target_rate:
        import torch  # only needed when resampling; keeps worker start-up light otherwise
        import torchaudio.functional

        resampled = torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(data.T)), rate, target_rate)
        data = resampled.T.numpy()
    return data


def _to_pcm16(data: np.ndarray) -> np.ndarray:
    """float → int16 with libsndfile's read scaling (x * 32768), so 16-bit sources round-trip exactly."""
    return np.clip(np.rint(data * 32768.0), -32768, 32767).astype(np.int16)


# --------------------------------------------------------------------------------------------------
# one track → samples (runs in worker processes)
# --------------------------------------------------------------------------------------------------


@dataclass
class _Sample:
    key: str
    meta: dict[str, Any]
    members: dict[str, bytes]  # member suffix ("flac", "drums.flac", "json") → bytes
    frames: int


@dataclass
class _Result:
    item: _Item
    samples: list[_Sample]
    rejected: str | None = None


def _process_item(item: _Item, opts: ShardOptions, rate: int, channels: int) -> _Result:
    try:
        return _Result(item, _chunk_item(item, opts, rate, channels))
    except _Rejected as err:
        return _Result(item, [], str(err))


def _chunk_item(item: _Item, opts: ShardOptions, rate: int, channels: int) -> list[_Sample]:
    signals: dict[str, np.ndarray] = {}
    rates: dict[str, int] = {}
    missing = [name for name, path in item.files if not os.path.exists(path)]
    if missing and opts.layout == "musdb":
        raise _Rejected(f"missing stem(s): {', '.join(missing)}")
    for name, path in item.files:
        data, rates[name] = _read_track(path)
        signals[name] = data
    if len(set(rates.values())) > 1:
        raise _Rejected("stems have different sample rates: " + ", ".join(f"{n} {r} Hz" for n, r in rates.items()))
    lengths = {name: len(data) for name, data in signals.items()}
    if len(set(lengths.values())) > 1:
        raise _Rejected("stems have unequal lengths: " + ", ".join(f"{n} {f} frames" for n, f in lengths.items()))
    source_rate = next(iter(rates.values()))
    pcm = {name: _to_pcm16(_convert(data, source_rate, rate, channels, name)) for name, data in signals.items()}
    total = len(next(iter(pcm.values())))
    chunk_frames = round(opts.chunk_seconds * rate)
    min_frames = round(opts.min_seconds * rate)
    if total < min_frames:
        raise _Rejected(f"too short: {total / rate:.2f} s is less than --min-seconds {opts.min_seconds} s")

    name = item.source if opts.layout == "musdb" else item.source.rsplit(".", 1)[0]  # files lose the extension
    track = name.rsplit("/", 1)[-1]
    track_id = _track_id(name, item.source)
    stems = list(opts.stems) if opts.layout == "musdb" else []
    samples = []
    for index, start in enumerate(range(0, total, chunk_frames)):
        frames = min(chunk_frames, total - start)
        if frames < min_frames:
            break
        chunk = {name: audio[start : start + frames] for name, audio in pcm.items()}
        reference = (chunk["mixture"] if "mixture" in chunk else chunk["audio"]).astype(np.float64) / 32768.0
        meta = {
            "source": item.source, "track": track, "chunk": index, "start": start, "frames": frames,
            "sample_rate": rate, "channels": channels, "stems": stems,
            "peak": round(float(np.abs(reference).max()), 6),
            "rms": round(float(np.sqrt(np.mean(reference**2))), 6),
        }
        if stems:
            meta["stem_rms"] = {s: round(float(np.sqrt(np.mean((chunk[s] / 32768.0) ** 2))), 6) for s in stems}
        members = {("" if name == "audio" else name + ".") + opts.codec: _encode(audio, rate, opts.codec)
                   for name, audio in chunk.items()}
        members["json"] = json.dumps(meta, sort_keys=True).encode()
        samples.append(_Sample(f"{track_id}-{index:05d}", meta, members, frames))
    return samples


def _track_id(name: str, source: str) -> str:
    """A readable, unique, dot-free name for a track (WebDataset splits keys at the first dot)."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[-40:]
    return f"{readable}-{hashlib.sha1(source.encode()).hexdigest()[:8]}"


def _encode(audio: np.ndarray, rate: int, codec: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format=codec.upper(), subtype="PCM_16")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# writing shards
# --------------------------------------------------------------------------------------------------


class _ShardWriter:
    """Writes one split's samples into ``<split>-NNNNNN.tar``; a shard gets its name only when complete
    (``publish(temporary file, name)`` renames or uploads it)."""

    def __init__(self, out: Path, split: str, shard_size: int, max_per_shard: int, chunk_frames: int, rate: int,
                 publish: Callable[[Path, str], None]):
        self.out, self.split, self.publish = out, split, publish
        self.shard_size, self.max_per_shard = shard_size, max_per_shard
        self.chunk_frames, self.rate = chunk_frames, rate
        self.shards: list[str] = []
        self.shard_samples: list[int] = []
        self.shard_short_chunks: list[list[int]] = []
        self.total_frames = 0
        self.min_frames: int | None = None
        self._tar: tarfile.TarFile | None = None
        self._temp: Path | None = None
        self._bytes = 0

    def add(self, sample: _Sample) -> None:
        size = sum(512 + len(b) + 511 for b in sample.members.values())  # tar header + padded data
        if self._tar is not None and (self.shard_samples[-1] >= self.max_per_shard
                                      or _tar_file_size(self._bytes + size) > self.shard_size):
            self.close()
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for suffix, data in sample.members.items():
            info = tarfile.TarInfo(f"{sample.key}.{suffix}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed mtime: reproducible shards
            self._tar.addfile(info, io.BytesIO(data))
        self._bytes += size
        self.shard_samples[-1] += 1
        if sample.frames < self.chunk_frames:
            self.shard_short_chunks[-1].append(sample.frames)
        self.total_frames += sample.frames
        self.min_frames = sample.frames if self.min_frames is None else min(self.min_frames, sample.frames)

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._temp = self.out / f".{name}.tmp"
        self._tar = tarfile.open(self._temp, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append(name)
        self.shard_samples.append(0)
        self.shard_short_chunks.append([])
        self._bytes = 0

    def close(self) -> None:
        if self._tar is None or self._temp is None:
            return
        self._tar.close()
        with open(self._temp, "rb") as f:
            os.fsync(f.fileno())
        self.publish(self._temp, self.shards[-1])
        self._tar, self._temp = None, None

    def summary(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "samples": sum(self.shard_samples),
            "seconds": round(self.total_frames / self.rate, 6),
            "min_seconds": None if self.min_frames is None else round(self.min_frames / self.rate, 6),
            "shard_samples": self.shard_samples,
            "shard_short_chunks": self.shard_short_chunks,  # frames of chunks shorter than chunk_frames
        }


def _tar_file_size(member_bytes: int) -> int:
    """The size of a tar file whose members take ``member_bytes``: plus the end marker, padded to a record."""
    return -(-(member_bytes + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _write_shards(src: Path, out: Path, items: list[_Item], opts: ShardOptions, rate: int, channels: int,
                  publish: Callable[[Path, str], None]) -> dict[str, Any]:
    """Write every shard (built in ``out``, then ``publish``-ed); returns the manifest, which the caller writes."""
    chunk_frames = round(opts.chunk_seconds * rate)
    writers = {s: _ShardWriter(out, s, opts.shard_size, opts.max_per_shard, chunk_frames, rate, publish)
               for s in SPLITS}
    rejected: list[dict[str, str]] = []
    bar = tqdm(total=len(items), desc=f"sharding {src.name}", unit="track", disable=not opts.progress,
               file=sys.stderr)
    with _executor(opts.workers) as pool:
        for result in _ordered_map(pool, items, opts, rate, channels, ahead=2 * opts.workers):
            bar.update(1)
            if result.rejected is not None:
                if opts.strict:
                    bar.close()
                    raise ShardError(f"--strict: rejected {result.item.source}: {result.rejected}")
                rejected.append({"source": result.item.source, "reason": result.rejected})
                continue
            for sample in result.samples:
                writers[result.item.split].add(sample)
    bar.close()
    for writer in writers.values():
        writer.close()

    if not any(sum(w.shard_samples) for w in writers.values()):
        reasons = "; ".join(f"{r['source']}: {r['reason']}" for r in rejected[:5])
        raise ShardError(f"no usable audio in SRC {src} ({len(rejected)} input(s) rejected: {reasons})")
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_by": "data_prep.shard",
        "source": str(src),
        "sample_rate": rate,
        "channels": channels,
        "codec": opts.codec,
        "sample_width_bits": 16,
        "layout": opts.layout,
        "stems": list(opts.stems) if opts.layout == "musdb" else [],
        "chunk_frames": chunk_frames,
        "options": dataclasses.asdict(opts),
        "splits": {s: w.summary() for s, w in writers.items()},
        "rejected": rejected,
    }
    return manifest


def _report(manifest: dict[str, Any], out: str) -> None:
    rejected = manifest["rejected"]
    _say(f"wrote {_describe(manifest)} to {out}")
    if rejected:
        _say(f"rejected {len(rejected)} input(s) (reasons in {MANIFEST_NAME}):")
        for entry in rejected[:20]:
            _say(f"  {entry['source']}: {entry['reason']}")
        if len(rejected) > 20:
            _say(f"  ... and {len(rejected) - 20} more")


def _describe(manifest: dict[str, Any]) -> str:
    parts = []
    for name, split in manifest.get("splits", {}).items():
        parts.append(f"{name}: {split.get('samples', 0)} samples, {split.get('seconds', 0):.1f} s "
                     f"in {len(split.get('shards', []))} shard(s)")
    return "; ".join(parts)


class _InlineExecutor(Executor):
    """Runs each task at once in this process (``--workers 1``: no process start-up, easy to debug)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _executor(workers: int) -> Executor:
    return _InlineExecutor() if workers == 1 else ProcessPoolExecutor(workers)


def _ordered_map(pool: Executor, items: Iterable[_Item], *args: Any, ahead: int) -> Iterator[_Result]:
    """``_process_item`` results in input order, at most ``ahead`` in flight (bounded memory for huge corpora)."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(_process_item, item, *args))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# --------------------------------------------------------------------------------------------------
# small helpers and the CLI
# --------------------------------------------------------------------------------------------------


def parse_size(text: str | int) -> int:
    """``"256MB"`` → 256000000, ``"1GiB"`` → 1073741824, ``"4096"`` → 4096."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 256MB, 1GiB, 500000)")
    number, prefix, binary = match.groups()
    power = " KMGT".index(prefix.upper() or " ")
    return int(float(number) * (1024 if binary else 1000) ** power)


def _write_json(path: Path, data: Any) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def _read_json(path: Path) -> Any:
    try:
        return _parse_json(path.read_bytes())
    except OSError:
        return None


def _parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ShardError(message)


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.shard",
        description="Turn audio files (--layout files) or MUSDB18-HQ folders (--layout musdb) into "
                    "WebDataset shards with a manifest.json.",
        epilog="example: python -m data_prep.shard ~/musdb18hq data/musdb --layout musdb --sample-rate 44100 "
               "--chunk-seconds 30 --workers 8")
    defaults = ShardOptions()
    parser.add_argument("src", help="input directory")
    parser.add_argument("out", help="output directory or s3:// / gs:// URL (must be empty or made by this tool)")
    parser.add_argument("--layout", choices=["files", "musdb"], default=defaults.layout,
                        help="files: every audio file under SRC, recursively; "
                             "musdb: SRC/{train,test}/<track>/<stem>.wav")
    parser.add_argument("--sample-rate", type=int, default=None,
                        help="output sample rate; inputs are resampled (default: the first input's rate)")
    parser.add_argument("--channels", type=int, choices=[1, 2], default=None,
                        help="output channels: stereo is downmixed to 1, mono duplicated to 2 (default: first input's)")
    parser.add_argument("--chunk-seconds", type=float, default=defaults.chunk_seconds,
                        help="long audio is cut into chunks of this length (one sample each)")
    parser.add_argument("--min-seconds", type=float, default=None,
                        help="a last chunk shorter than this is dropped; a shorter track is rejected "
                             "(default: 1 s, or --chunk-seconds if that is shorter)")
    parser.add_argument("--codec", choices=["flac", "wav"], default=defaults.codec, help="16-bit audio codec")
    parser.add_argument("--shard-size", type=parse_size, default=defaults.shard_size,
                        help="start a new shard before one exceeds this many bytes (e.g. 256MB, 1GiB)")
    parser.add_argument("--max-per-shard", type=int, default=defaults.max_per_shard,
                        help="start a new shard after this many samples")
    parser.add_argument("--valid-fraction", type=float, default=defaults.valid_fraction,
                        help="files layout: fraction of tracks (by a stable hash of their path) used for validation")
    parser.add_argument("--stems", nargs="+", default=list(DEFAULT_STEMS),
                        help="musdb layout: stem names besides mixture")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="decoding processes")
    parser.add_argument("--strict", action="store_true", help="stop with exit code 1 at the first rejected input")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild OUT even if it is complete or holds other data")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    src, out = args.pop("src"), args.pop("out")
    try:
        shard_dataset(src, out, **args)
    except ShardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. OUT cannot be created: a user problem, not a bug
        print(f"error: {err.strerror or err}: {err.filename or out}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: {out} is incomplete; run the same command again to finish it", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
