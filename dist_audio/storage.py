"""Where shards live: a local directory or an object-store URL (``s3://``, ``gs://``, ``http(s)://``).

``Store`` reads and writes the files under one such location. Local paths use the file system
directly; URLs go through fsspec (``s3fs`` / ``gcsfs`` are optional extras: ``pip install
dist_audio[s3]`` or ``[gcs]``; http needs only ``aiohttp``). Every remote operation is retried with
exponential backoff on transient errors (timeouts, connection resets or refusals, HTTP 5xx / 429, S3
SlowDown) and each retry is counted (``take_retries``); a source that stays down for
``timeout_s`` raises ``SourceUnavailable`` naming the URL and the last error.

S3 endpoint and credentials come from the standard places (``AWS_*`` variables, ``AWS_ENDPOINT_URL``
for S3-compatible stores, ``~/.aws``), never from the URL or the run config, so nothing secret is
logged or saved. A string that looks like a URL of a scheme we do not handle is refused
(``parse_location`` raises ``ValueError``) rather than read as a relative path such as ``s3:/bucket``.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["DiskCache", "Location", "SourceUnavailable", "Store", "parse_location", "take_retries"]

# scheme → (fsspec protocol, the package that provides it, the pip extra that installs it)
_SCHEMES = {"s3": ("s3", "s3fs", "s3"), "gs": ("gs", "gcsfs", "gcs"), "gcs": ("gs", "gcsfs", "gcs"),
            "http": ("http", "aiohttp", "http"), "https": ("https", "aiohttp", "http")}
_URL_LIKE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_T = TypeVar("_T")
_retries = 0  # retries made by this process since the last take_retries()


class SourceUnavailable(RuntimeError):
    """A remote data source stayed unreachable longer than the configured timeout."""


def take_retries() -> int:
    """Remote retries this process made since the last call (the loader puts them into each batch)."""
    global _retries
    count, _retries = _retries, 0
    return count


@dataclass(frozen=True)
class Location:
    """A parsed ``data.shards`` value: ``scheme`` is "" for a local directory."""

    url: str  # local path, or the URL without a trailing slash
    scheme: str

    @property
    def remote(self) -> bool:
        return bool(self.scheme)

    def join(self, name: str) -> str:
        return f"{self.url}/{name}" if self.remote else os.path.join(self.url, name)


def parse_location(text: str) -> Location:
    """A local path or a supported URL; raises ``ValueError`` for anything else that looks like a URL,
    for credentials written into a URL, and when the package a scheme needs is not installed."""
    match = _URL_LIKE.match(text)
    if not match or (match.group(1).lower() not in _SCHEMES and not text[match.end() :].startswith("/")):
        return Location(text, "")  # no scheme (a colon elsewhere in a file name is just a character)
    scheme = match.group(1).lower()
    if scheme not in _SCHEMES:
        raise ValueError(f"{text!r}: unsupported URL scheme {scheme}:// (supported: a local directory, "
                         "s3://, gs://, http://, https://)")
    rest = text[len(scheme) + 1 :]
    if not rest.startswith("//") or not rest[2:].split("/", 1)[0]:
        raise ValueError(f"{text!r} is not a valid URL: expected {scheme}://host-or-bucket/prefix")
    if "@" in rest[2:].split("/", 1)[0]:
        raise ValueError(f"{text!r}: credentials do not belong in the URL (it is saved with the run config); "
                         "use the AWS_* variables or ~/.aws")
    _, package, extra = _SCHEMES[scheme]
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"{scheme}:// needs the {package} package: pip install 'dist_audio[{extra}]'")
    return Location(f"{scheme}:{rest}".rstrip("/"), scheme)


def _transient(err: BaseException) -> bool:
    """Worth retrying: the same request may well succeed a moment later."""
    status = getattr(err, "status", None)
    if isinstance(status, int):  # aiohttp.ClientResponseError (http)
        return status >= 500 or status in (408, 429)
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        FileExistsError)):
        return False
    if isinstance(err, OSError) and err.errno in (errno.EINVAL, errno.ENOSPC):
        return False
    if isinstance(err, (OSError, TimeoutError, ConnectionError)):
        return True
    module = type(err).__module__.split(".", 1)[0]
    return module in ("aiohttp", "botocore", "aiobotocore", "urllib3", "requests")


def _http_size(url: str, timeout: float) -> int:
    """Content-Length of a HEAD request; 404/410 → ``FileNotFoundError``, 401/403 → ``PermissionError``."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as response:
            length = response.headers.get("Content-Length")
    except urllib.error.HTTPError as err:
        if err.code in (404, 410):
            raise FileNotFoundError(url) from None
        if err.code in (401, 403):
            raise PermissionError(f"{url}: HTTP {err.code}") from None
        raise
    if length is None:
        raise ValueError(f"{url}: the server gives no Content-Length, so ranged reads cannot be planned")
    return int(length)


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text and text[0] else type(err).__name__


class Store:
    """The files directly under one location; remote calls retried (see the module docstring).

    Picklable: a DataLoader worker makes its own fsspec client on first use.
    """

    def __init__(self, location: str | Location, timeout_s: float = 60.0):
        self.location = location if isinstance(location, Location) else parse_location(location)
        self.timeout_s = timeout_s
        self._fs: Any = None
        self._fs_pid = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}

    @property
    def url(self) -> str:
        return self.location.url

    @property
    def remote(self) -> bool:
        return self.location.remote

    @property
    def writable(self) -> bool:
        return self.location.scheme not in ("http", "https")

    def path(self, name: str) -> str:
        return self.location.join(name)

    def _filesystem(self) -> Any:
        if self._fs is None or self._fs_pid != os.getpid():  # fsspec clients do not survive a fork
            import fsspec

            self._fs_pid = os.getpid()
            protocol = _SCHEMES[self.location.scheme][0]
            per_try = min(30.0, max(1.0, self.timeout_s))
            if protocol == "s3":
                # one attempt per call: the retries (and their count) are ours
                self._fs = fsspec.filesystem("s3", skip_instance_cache=True, config_kwargs={
                    "retries": {"max_attempts": 1, "mode": "standard"},
                    "connect_timeout": min(5.0, per_try), "read_timeout": per_try})
                self._fs.retries = 1
            elif protocol in ("http", "https"):
                import aiohttp

                self._fs = fsspec.filesystem(protocol, skip_instance_cache=True, client_kwargs={
                    "timeout": aiohttp.ClientTimeout(total=per_try, connect=min(5.0, per_try))})
            else:
                self._fs = fsspec.filesystem(protocol, skip_instance_cache=True)
        return self._fs

    def _call(self, name: str, operation: Callable[..., _T], *args: Any) -> _T:
        """``operation(*args)``, retried on transient errors until ``timeout_s`` has passed."""
        global _retries
        deadline, delay = None, 0.05
        while True:
            try:
                return operation(*args)
            except Exception as err:
                if not _transient(err):
                    raise
                now = time.monotonic()
                deadline = deadline or now + self.timeout_s
                if now >= deadline:
                    raise SourceUnavailable(f"data source {self.path(name)} unreachable for {self.timeout_s:g} s "
                                            f"(data.remote_timeout_s); last error: {_describe(err)}") from None
                _retries += 1
                time.sleep(min(delay, deadline - now))
                delay = min(2 * delay, 2.0)

    # ---- reading ----

    def read(self, name: str) -> bytes:
        if not self.remote:
            return Path(self.path(name)).read_bytes()
        return self._call(name, lambda: self._filesystem().cat_file(self.path(name)))

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a file (one ranged GET for a URL)."""
        if not self.remote:
            with open(self.path(name), "rb") as f:
                f.seek(start)
                return f.read(end - start)
        return self._call(name, lambda: self._filesystem().cat_file(self.path(name), start=start, end=end))

    def size(self, name: str) -> int:
        if not self.remote:
            return os.path.getsize(self.path(name))
        if not self.writable:  # fsspec's http size() turns a failing HEAD into FileNotFoundError: ask ourselves
            return self._call(name, _http_size, self.path(name), min(30.0, self.timeout_s))
        return int(self._call(name, lambda: self._filesystem().size(self.path(name))))

    def exists(self, name: str) -> bool:
        if not self.remote:
            return os.path.exists(self.path(name))
        try:
            self.size(name)
        except FileNotFoundError:
            return False
        return True

    def is_container(self) -> bool:
        """Local: the directory exists. URLs have no directories to check; always True."""
        return os.path.isdir(self.url) if not self.remote else True

    def list(self) -> list[str]:
        """Names of the files directly under the location (not available over http)."""
        if not self.remote:
            return sorted(os.listdir(self.url)) if os.path.isdir(self.url) else []
        if not self.writable:
            raise ValueError(f"{self.url}: an http(s) location cannot be listed")
        fs = self._filesystem()
        try:
            entries = self._call("", lambda: fs.ls(self.url, detail=False, refresh=True))
        except FileNotFoundError:
            return []
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    # ---- writing (local directories, s3://, gs://) ----

    def put_file(self, local: str | Path, name: str) -> None:
        """Upload (or, locally, move into place) a complete file: it appears whole or not at all."""
        if not self.remote:
            os.replace(local, self.path(name))
            return
        self._call(name, lambda: self._filesystem().put_file(str(local), self.path(name)))

    def write(self, name: str, data: bytes) -> None:
        if not self.remote:
            temp = self.path(f".{name}.tmp")
            with open(temp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.path(name))
            return
        self._call(name, lambda: self._filesystem().pipe_file(self.path(name), data))

    def delete(self, name: str) -> None:
        if not self.remote:
            Path(self.path(name)).unlink(missing_ok=True)
            return
        try:
            self._call(name, lambda: self._filesystem().rm_file(self.path(name)))
        except FileNotFoundError:
            pass


class DiskCache:
    """Files keyed by strings under ``root``, at most about ``max_bytes`` in all (oldest used dropped first).

    Safe for several worker processes at once: entries appear by rename, and a file another process
    removed is simply a miss.
    """

    _EVICT_EVERY = 64 << 20  # bytes written by this process between size checks

    def __init__(self, root: str | Path, max_bytes: int):
        self.root, self.max_bytes = Path(root), max_bytes
        self._written = self._EVICT_EVERY  # check on the first write

    def _file(self, key: str) -> Path:
        digest = hashlib.sha1(key.encode()).hexdigest()
        return self.root / digest[:2] / digest

    def get(self, key: str) -> bytes | None:
        path = self._file(key)
        try:
            data = path.read_bytes()
            os.utime(path)  # recently used: evicted last
        except FileNotFoundError:
            return None
        return data

    def put(self, key: str, data: bytes) -> None:
        path = self._file(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            temp.write_bytes(data)
            os.replace(temp, path)
        except OSError:  # a full or read-only cache disk costs speed, not the run
            return
        self._written += len(data)
        if self._written >= self._EVICT_EVERY:
            self._written = 0
            self.evict()

    def evict(self) -> None:
        """Drop the least recently used entries until the cache holds at most 90% of ``max_bytes``."""
        entries = []
        for directory in self.root.glob("??"):
            for path in directory.iterdir():
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        if total <= self.max_bytes:
            return
        for _, size, path in sorted(entries):
            if total <= 0.9 * self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
