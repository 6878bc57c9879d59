"""Reading ``data_prep.shard`` tar shards safely, one crop at a time.

A shard is indexed by walking its tar headers (the data blocks are skipped, not read). Each sample
becomes a ``SampleRef``: its key, its parsed JSON metadata and the byte range of every audio member.
``read_crop`` then opens just that byte range as a file for libsndfile and seeks to the crop, so the
cost of a crop does not grow with the length of the chunk it comes from.

Shards at a URL (``ShardSource`` over a ``dist_audio.storage.Store``) are read the same way through
ranged reads: indexing costs about one small request per audio member (a header and the JSON after it
come in one read), a crop fetches its own 64 KiB blocks plus what FLAC seeking touches, never a whole
shard. With a ``DiskCache`` the indexes and the fetched blocks are kept on local disk for later epochs.

Shards are untrusted input: only ``.json`` and ``.flac``/``.wav`` members are ever read (a ``.pyd`` or
pickle member is never decoded), member names with ``..`` or an absolute path are refused, and every
problem surfaces as a ``BadSample`` (skipped and counted by the loader) rather than an exception.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import soundfile as sf

from dist_audio.storage import DiskCache, SourceUnavailable, Store

__all__ = ["AUDIO_EXTENSIONS", "BadSample", "SampleRef", "ShardReader", "ShardSource", "index_shard", "iter_shard",
           "read_crop"]

AUDIO_EXTENSIONS = ("flac", "wav")
_MAX_JSON_BYTES = 1 << 20
_BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(_BLOCK)


@dataclass
class SampleRef:
    """One sample of a shard: metadata plus where each audio member's bytes lie in the shard file."""

    shard: str  # path or URL of the shard file
    key: str
    meta: dict[str, Any]
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # signal → (offset, size); "audio" or a stem

    @property
    def frames(self) -> int:
        return int(self.meta["frames"])


@dataclass
class BadSample:
    """A sample (or the rest of a shard) that could not be used; ``count`` samples were lost."""

    shard: str
    reason: str
    count: int = 1


def iter_shard(path: str, expected_samples: int | None = None,
               source: ShardSource | None = None) -> Iterator[SampleRef | BadSample]:
    """Yield the samples of one shard in order, and a ``BadSample`` for each one that is unusable.

    ``expected_samples`` (from the manifest) lets a truncated shard account for the samples it lost.
    ``source`` reads shards at a URL; without it ``path`` is a local file.
    """
    name = os.path.basename(path)
    seen = 0
    source = source or _LOCAL
    try:
        f, size = source.open(path)
        with f:
            group: list[_Member] = []
            for member in _tar_members(f, size):
                if group and member.key != group[0].key:
                    seen += 1
                    yield _parse_sample(f, path, group, size)
                    group = []
                group.append(member)
            if group:
                seen += 1
                yield _parse_sample(f, path, group, size)
    except (tarfile.TarError, OSError) as err:
        lost = max(1, (expected_samples or 0) - seen)
        yield BadSample(path, f"{name} is unreadable after {seen} sample(s): {err}", lost)
        return
    if expected_samples is not None and seen < expected_samples:
        yield BadSample(path, f"{name} holds {seen} samples but the manifest lists {expected_samples} "
                              "(truncated shard?)", expected_samples - seen)


def index_shard(path: str, expected_samples: int, source: ShardSource | None = None) -> list[SampleRef | BadSample]:
    """Entry ``i`` is sample ``i`` of the shard (as the manifest counts them), or why it cannot be used."""
    if source is not None:
        return source.index(path, expected_samples)
    return _walk_index(path, expected_samples, _LOCAL)


def _walk_index(path: str, expected_samples: int, source: ShardSource) -> list[SampleRef | BadSample]:
    entries: list[SampleRef | BadSample] = []
    for item in iter_shard(path, expected_samples, source):
        entries += [item] if isinstance(item, SampleRef) else [item] * item.count
    return entries[:expected_samples]


class ShardSource:
    """Opens the shard files of one location: a local directory, or a URL through ``store`` (optionally with
    a ``cache`` for indexes and fetched blocks, its keys qualified by ``version``, e.g. the manifest digest)."""

    def __init__(self, store: Store | None = None, cache: DiskCache | None = None, version: str = ""):
        self.store = store if store is not None and store.remote else None
        self.cache = cache if self.store is not None else None
        self.version = version

    def open(self, path: str) -> tuple[BinaryIO, int]:
        """The shard as a seekable binary file for walking its headers, and its size in bytes."""
        if self.store is None:
            f = open(path, "rb")
            return f, os.fstat(f.fileno()).st_size
        remote = _RemoteShardFile(self.store, self._name(path), None, "")  # small reads, not cached blocks
        return remote, remote.size  # type: ignore[return-value]

    def open_file(self, path: str) -> BinaryIO:
        """The shard as a file for decoding crops; a URL is asked for its size only when a read needs it."""
        if self.store is None:
            return open(path, "rb")
        return _RemoteShardFile(self.store, self._name(path), self.cache, f"{self.version}:{path}")  # type: ignore

    def index(self, path: str, expected_samples: int) -> list[SampleRef | BadSample]:
        """``index_shard`` through this source; a complete index is kept in the cache."""
        key = f"index:{self.version}:{path}:{expected_samples}"
        if self.cache is not None and (cached := self.cache.get(key)) is not None:
            return [SampleRef(path, e["key"], e["meta"], {k: tuple(v) for k, v in e["members"].items()})
                    for e in json.loads(cached)]
        entries = _walk_index(path, expected_samples, self)
        if self.cache is not None and all(isinstance(e, SampleRef) for e in entries):  # no transient failures kept
            self.cache.put(key, json.dumps([{"key": e.key, "meta": e.meta, "members": e.members}
                                            for e in entries]).encode())
        return entries

    def _name(self, path: str) -> str:
        assert self.store is not None
        prefix = self.store.url + "/"
        if not path.startswith(prefix):
            raise ValueError(f"{path} is not under {self.store.url}")
        return path[len(prefix) :]


_LOCAL = ShardSource()


class _RemoteShardFile:
    """A read-only, seekable file over ranged reads of one remote shard.

    Without a cache (indexing, or no ``data.cache_dir``), a read fetches at least ``_PEEK`` bytes and
    remembers them, so a tar header and the metadata member after it cost one request. With a cache
    (crops), reads go through ``_BLOCK``-aligned blocks kept on disk, and a crop whose blocks are all
    cached makes no request at all (the size is asked for only when something must be fetched).
    """

    _PEEK = 8 << 10
    _BLOCK = 64 << 10

    def __init__(self, store: Store, name: str, cache: DiskCache | None, key: str):
        self.store, self.name, self.cache, self.key = store, name, cache, key
        self._size: int | None = None
        self._pos = 0
        self._memo_start, self._memo = 0, b""

    def __enter__(self) -> _RemoteShardFile:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def size(self) -> int:
        if self._size is None:
            self._size = self.store.size(self.name)
        return self._size

    def close(self) -> None:
        self._memo = b""

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        self._pos = pos if whence == io.SEEK_SET else (self._pos + pos if whence == io.SEEK_CUR else self.size + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        start = self._pos
        if n is None or n < 0:
            n = self.size - start
        if n <= 0:
            return b""
        begin = start - self._memo_start
        if 0 <= begin and begin + n <= len(self._memo):
            data = self._memo[begin : begin + n]
        elif self.cache is not None:
            data = self._blocks(start, n)
        elif start >= self.size:
            data = b""
        else:
            self._memo_start = start
            self._memo = self.store.read_range(self.name, start, min(self.size, start + max(n, self._PEEK)))
            data = self._memo[:n]
        self._pos = start + len(data)
        return data

    def _blocks(self, start: int, n: int) -> bytes:
        """Bytes ``[start, start + n)`` from cached blocks, fetching each run of missing blocks in one read."""
        assert self.cache is not None
        first, last = start // self._BLOCK, (start + n - 1) // self._BLOCK
        blocks = {k: self.cache.get(f"block:{self.key}:{k}") for k in range(first, last + 1)}
        k = first
        while k <= last:
            if blocks[k] is not None:
                k += 1
                continue
            end = k
            while end + 1 <= last and blocks[end + 1] is None:
                end += 1
            begin, stop = k * self._BLOCK, min(self.size, (end + 1) * self._BLOCK)
            data = self.store.read_range(self.name, begin, stop) if begin < stop else b""  # past a cut-off end
            for j in range(k, end + 1):
                blocks[j] = data[(j - k) * self._BLOCK : (j - k + 1) * self._BLOCK]
                if blocks[j]:
                    self.cache.put(f"block:{self.key}:{j}", blocks[j])
            k = end + 1
        joined = b"".join(blocks[k] or b"" for k in range(first, last + 1))
        offset = start - first * self._BLOCK
        return joined[offset : offset + n]


class _Member(NamedTuple):
    name: str
    offset: int  # of the data in the shard file
    size: int
    regular: bool

    @property
    def key(self) -> str:
        directory, _, base = self.name.rpartition("/")
        return f"{directory}/{base.split('.', 1)[0]}" if directory else base.split(".", 1)[0]


def _tar_members(f: BinaryIO, size: int) -> Iterator[_Member]:
    """The members of a tar file from their headers alone (data blocks are skipped, not read).

    ``tarfile`` does the same at several times the cost per member, which a loader pays for every sample
    of every shard it indexes. Reads ustar headers and the pax and GNU long-name extensions; raises
    ``tarfile.ReadError`` for a header that is not one.
    """
    offset, long_name, pax = 0, None, {}
    while offset + _BLOCK <= size:
        f.seek(offset)
        header = f.read(_BLOCK)
        if len(header) < _BLOCK:
            raise tarfile.ReadError(f"unexpected end of data at byte {offset}")
        if header == _ZERO_BLOCK:
            return
        try:
            checksum = int(header[148:156].strip(b" \0") or b"0", 8)
            member_size = _tar_number(header[124:136])
        except ValueError:
            raise tarfile.ReadError(f"invalid tar header at byte {offset}") from None
        if checksum != sum(header[:148]) + sum(header[156:]) + 8 * 32:
            raise tarfile.ReadError(f"bad tar header checksum at byte {offset}")
        kind, data = header[156:157], offset + _BLOCK
        if kind not in (b"L", b"x", b"g") and "size" in pax:
            member_size = int(pax["size"])
        offset = data + -(-member_size // _BLOCK) * _BLOCK
        if kind in (b"L", b"x", b"g"):  # a long name, or pax records, for the next member (global: ignored)
            if member_size > _MAX_JSON_BYTES:
                raise tarfile.ReadError(f"oversized extended header at byte {data - _BLOCK}")
            f.seek(data)
            payload = f.read(member_size)
            try:
                if kind == b"L":
                    long_name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif kind == b"x":
                    pax = _pax_records(payload)
            except ValueError:
                raise tarfile.ReadError(f"invalid extended header at byte {data - _BLOCK}") from None
            continue
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        yield _Member(pax.get("path") or long_name or name.decode("utf-8", "surrogateescape"), data, member_size,
                      kind in (b"0", b"\0"))
        long_name, pax = None, {}


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes beyond 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b" \0") or b"0", 8)


def _pax_records(payload: bytes) -> dict[str, str]:
    """Records ``<length> <key>=<value>\\n``; raises ``ValueError`` if they are malformed."""
    records, position = {}, 0
    while position < len(payload) and payload[position] != 0:
        space = payload.index(b" ", position)
        length = int(payload[position:space])
        if length <= space - position:
            raise ValueError("pax record length")
        key, _, value = payload[space + 1 : position + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        position += length
    int(records.get("size", "0"))  # a size that is not a number is malformed too
    return records


def _parse_sample(f: BinaryIO, path: str, members: list[_Member], size: int) -> SampleRef | BadSample:
    name = os.path.basename(path)
    key = members[0].key
    meta: dict[str, Any] | None = None
    audio: dict[str, tuple[int, int]] = {}
    for member in members:
        if member.name.startswith("/") or ".." in member.name.split("/"):
            return BadSample(path, f"{name}: refused member name {member.name!r} (absolute or '..')")
        if not member.regular:
            return BadSample(path, f"{name}: member {member.name!r} is not a regular file")
        if member.offset + member.size > size:
            return BadSample(path, f"{name}: member {member.name!r} is cut off (truncated shard)")
        base = member.name.rpartition("/")[2]
        suffix = base.split(".", 1)[1] if "." in base else ""
        extension = suffix.rsplit(".", 1)[-1].lower()
        if suffix == "json":
            if member.size > _MAX_JSON_BYTES:
                return BadSample(path, f"{name}: {member.name} is too large for metadata")
            f.seek(member.offset)
            try:
                meta = json.loads(f.read(member.size))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                return BadSample(path, f"{name}: {member.name} is not valid JSON ({err})")
        elif extension in AUDIO_EXTENSIONS:
            signal = suffix.rsplit(".", 1)[0] if "." in suffix else "audio"
            audio[signal] = (member.offset, member.size)
        # any other member (.pyd, .pickle, .npy, ...) is ignored: never decoded
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), int) or meta["frames"] <= 0:
        return BadSample(path, f"{name}: sample {key} has no valid JSON metadata")
    if not audio:
        return BadSample(path, f"{name}: sample {key} has no audio member")
    return SampleRef(path, key, meta, audio)


class _MemberView(io.RawIOBase):
    """A read-only, seekable window onto bytes [offset, offset + size) of an open file.

    libsndfile asks for a few KiB at a time; reading ahead in larger blocks saves a system call per request.
    """

    _READ_AHEAD = 1 << 16  # measured: 4 reads and ~1.7× the crop's FLAC bytes for a 1 s crop

    def __init__(self, f: BinaryIO, offset: int, size: int):
        super().__init__()
        self._f, self._offset, self._size, self._pos = f, offset, size, 0
        self._block_start, self._block = 0, memoryview(b"")
        self.error: Exception | None = None  # raised while libsndfile read: its callbacks cannot pass it on

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            pos += self._pos
        elif whence == io.SEEK_END:
            pos += self._size
        elif whence != io.SEEK_SET:
            raise ValueError(f"invalid whence {whence}")
        self._pos = min(max(pos, 0), self._size)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        buffer = bytearray(self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos))
        return bytes(buffer[: self.readinto(buffer)])

    def readinto(self, buffer: Any) -> int:
        """What libsndfile's callbacks use, some 25 times per crop: one copy straight from the block, little else."""
        pos = self._pos
        n = min(len(buffer), self._size - pos)
        if n <= 0:
            return 0
        begin = pos - self._block_start
        if begin < 0 or begin + n > len(self._block):
            try:
                self._f.seek(self._offset + pos)
                self._block = memoryview(self._f.read(min(max(n, self._READ_AHEAD), self._size - pos)))
            except Exception as err:  # a remote source gone: kept for the caller, libsndfile sees the end
                self.error = err
                return 0
            self._block_start, begin = pos, 0
            n = min(n, len(self._block))  # a shard cut short under us yields fewer bytes
        buffer[:n] = self._block[begin : begin + n]
        self._pos = pos + n
        return n


class ShardReader:
    """Decodes crops, keeping the last few shard files open: crops from recently read shards skip the open.

    Use as a context manager or call ``close()``; one reader per worker (it is not shared across processes).
    """

    def __init__(self, open_files: int = 8, source: ShardSource | None = None) -> None:
        self._open_files = open_files
        self._source = source or _LOCAL
        self._files: OrderedDict[str, BinaryIO] = OrderedDict()  # least recently used first

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        while self._files:
            self._files.popitem()[1].close()

    def _open(self, path: str) -> BinaryIO:
        if path in self._files:
            self._files.move_to_end(path)
        else:
            if len(self._files) >= self._open_files:
                self._files.popitem(last=False)[1].close()
            self._files[path] = self._source.open_file(path)
        return self._files[path]

    def _forget(self, path: str) -> None:
        if path in self._files:
            self._files.pop(path).close()

    def read_crop(self, ref: SampleRef, signal: str, start: int, frames: int, dtype: str = "float32") -> np.ndarray:
        """See ``read_crop``."""
        if signal not in ref.members:
            raise ValueError(f"sample {ref.key} has no {signal!r} member")
        offset, size = ref.members[signal]
        available = max(0, min(frames, ref.frames - start))
        view: _MemberView | None = None
        try:
            view = _MemberView(self._open(ref.shard), offset, size)  # opening a remote shard may raise
            with sf.SoundFile(view) as sound:
                if sound.frames < ref.frames:
                    raise ValueError(f"{signal} member holds {sound.frames} frames, metadata says {ref.frames}")
                sound.seek(start)
                crop = np.zeros((frames, sound.channels), dtype)  # decoded in place; the rest stays zero
                decoded = len(sound.read(out=crop[:available])) if available else 0
            failure: Exception | None = view.error
        except (sf.LibsndfileError, RuntimeError, OSError) as err:
            failure = (view.error if view is not None else None) or err
        if failure is not None:
            self._forget(ref.shard)  # the next crop reopens the file rather than trust its state
            if isinstance(failure, SourceUnavailable):
                raise failure  # the source is down, not the sample bad: the run stops naming it
            raise ValueError(f"cannot decode {signal} of {ref.key}: {failure}") from None
        if decoded < available:
            raise ValueError(f"{signal} of {ref.key}: decoded {decoded} of {available} frames")
        return crop.T  # [channels, frames] view of frame-major memory: .T.reshape(-1) interleaves L R L R


def read_crop(ref: SampleRef, signal: str, start: int, frames: int, dtype: str = "float32") -> np.ndarray:
    """Decode ``frames`` frames of one audio member from ``start`` (zero-padded past the chunk's end).

    Returns ``[channels, frames]`` of ``dtype`` (float32 in [-1, 1], or the int16 samples as stored).
    Raises ``ValueError`` if the member is missing or corrupt.
    """
    with ShardReader() as reader:
        return reader.read_crop(ref, signal, start, frames, dtype)
