"""Writes that survive a full disk and a lost node: fsynced files and directories, atomic replacement,
fsynced appends, one-line causes, and a guard that turns an optional writer off instead of the run.

A rename publishes a file or directory only once its bytes and the directory entries are on disk
(``fsync`` of the file, then of its directory), so after a power or node loss a name either points to
complete data or does not exist. ``describe_error`` reduces anything a filesystem, ``torch.save`` or
``torch.distributed.checkpoint`` raises on a full disk to one line naming the file and the cause.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from torch.distributed.checkpoint.api import CheckpointException

logger = logging.getLogger(__name__)

WRITE_ERRORS = (OSError, RuntimeError, CheckpointException)  # torch.save raises RuntimeError on ENOSPC
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}
HASH_CHUNK = 1 << 22
FULL_BELOW_BYTES = 1 << 20  # a write that failed with less than this free failed for want of space

F = TypeVar("F", bound=Callable[..., Any])


def fsync_dir(directory: str | Path) -> None:
    """Make the entries of ``directory`` (creations, renames, deletions) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file under ``root``, then every directory bottom-up, ``root`` included."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(os.path.join(directory, name))
        fsync_dir(directory)


def replace_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Replace ``path`` all at once with what ``write(temporary path)`` writes beside it: fsynced, renamed
    over ``path``, directory fsynced. On any error the old content stays and the temporary file goes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """``replace_atomically`` with ``data`` (text is UTF-8)."""
    replace_atomically(path, lambda tmp: tmp.write_bytes(data.encode() if isinstance(data, str) else data))


def append_line(path: str | Path, line: str) -> None:
    """Append one line and fsync it, so a line that was reported written survives a node loss. A line
    that does not fit on the disk is cut back off, so the file never ends in half a line."""
    data = line.rstrip("\n").encode() + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):  # a write to a nearly full disk may take only part of it
                written += os.write(fd, data[written:])
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_error(err: BaseException, where: str | Path | None = None) -> str:
    """One line for the cause of a failed write: ``[Errno 28] No space left on device: '<file>'``; a DCP
    ``CheckpointException`` is reduced to the first rank's underlying error. ``torch.save`` on a full
    disk only says ``unexpected pos``: with ``where`` (the directory written to) a full filesystem is named
    as the cause."""
    if isinstance(err, CheckpointException):
        for rank, failure in sorted(err.failures.items()):
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, BaseException):
                return f"{describe_error(inner, where)} (rank {rank} of the checkpoint writer)"
        return str(err).splitlines()[0]
    if isinstance(err, OSError) and err.strerror:
        location = f": {err.filename!r}" if err.filename else ""
        return f"[Errno {err.errno}] {err.strerror}{location}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = f"{type(err).__name__}: {lines[0] if lines else 'no message'}"
    free = free_bytes(where) if where is not None else None
    if free is not None and free < FULL_BELOW_BYTES:
        return f"no space left on the filesystem of {where} ({free // 1024} KiB free; {message})"
    return message


def free_bytes(path: str | Path) -> int | None:
    """Bytes an unprivileged writer may still use on the filesystem of ``path`` (or its nearest existing
    parent); ``None`` when it cannot be asked."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def optional_writer(what: str) -> Callable[[F], F]:
    """Decorates the methods of a writer the run can do without (TensorBoard events): the first write
    error (a full disk) turns that instance's decorated methods into no-ops with one warning naming
    ``what`` and the cause, instead of ending the run. Checkpoints, which the run cannot do without, fail
    on their own (``checkpoint.save_checkpoint``)."""

    def decorate(method: F) -> F:
        @functools.wraps(method)
        def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
            if writer_error(self):
                return None
            try:
                return method(self, *args, **kwargs)
            except OSError as err:
                self._write_error = describe_error(err)
                logger.warning("%s stopped: %s; training goes on without it", what, self._write_error)
                return None

        return guarded  # type: ignore[return-value]

    return decorate


def writer_error(writer: Any) -> str | None:
    """Why the ``optional_writer`` methods of ``writer`` stopped writing, or ``None`` while they write."""
    return getattr(writer, "_write_error", None)


def quiet_disk_errors_in_threads() -> None:
    """A background writer thread (TensorBoard's event writer) that dies of a disk error logs one line
    instead of a traceback; its owner sees the same error on its next call (``optional_writer``). Other
    exceptions in threads are reported as before. Idempotent."""
    previous = threading.excepthook
    if getattr(previous, "_dist_audio_quiet", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, OSError) and args.exc_value.errno in DISK_ERRNOS:
            name = args.thread.name if args.thread is not None else "?"
            logger.warning("background writer thread %s stopped: %s", name, describe_error(args.exc_value))
            return
        previous(args)

    hook._dist_audio_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook
