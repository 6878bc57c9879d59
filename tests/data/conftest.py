"""Loopback servers for the object-storage tests: moto's S3 server and an HTTP file server honouring Range."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_prep.shard import shard_dataset


class RangeServer:
    """Serves the files under ``root`` on 127.0.0.1 with HEAD and ranged GET; ``fail_every = n`` answers every
    n-th request with 503. Counts requests, 503s and body bytes; ``stop()`` and ``start()`` again keep the port."""

    def __init__(self, root: Path, fail_every: int = 0):
        self.root, self.fail_every = Path(root), fail_every
        self.port = 0
        self.requests = self.failures = self.bytes_sent = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RangeServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                with owner._lock:
                    owner.requests += 1
                    fail = owner.fail_every and owner.requests % owner.fail_every == 0
                    owner.failures += bool(fail)
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = owner.root / self.path.lstrip("/").split("?", 1)[0]
                if not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size = path.stat().st_size
                start, end = 0, size
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if match:
                    start, end = int(match.group(1)), min(size, int(match.group(2) or size - 1) + 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(end - start))
                self.end_headers()
                if body:
                    with open(path, "rb") as f:
                        f.seek(start)
                        data = f.read(end - start)
                    with owner._lock:
                        owner.bytes_sent += len(data)
                    self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def range_server() -> Iterator[type[RangeServer]]:
    """``range_server(root, fail_every=0)`` → a started ``RangeServer``, stopped after the test."""
    started: list[RangeServer] = []

    def start(root: Path, fail_every: int = 0) -> RangeServer:
        started.append(RangeServer(root, fail_every).start())
        return started[-1]

    yield start  # type: ignore[misc]
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1, reached through the standard AWS_* variables (for child processes too)."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    names = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1"})
    yield f"http://{host}:{port}"
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A new empty bucket: ``s3://<name>``."""
    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + "-b"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def long_chunk_shards(tmp_path: Path) -> tuple[Path, Path]:
    """(source WAV, shard directory): 60 s of 16 kHz noise stored as one 60 s chunk, for tests that crop
    1 s out of it and count what was read."""
    src = tmp_path / "src"
    src.mkdir()
    wav = src / "long.wav"
    sf.write(wav, 0.1 * np.random.default_rng(0).standard_normal(16000 * 60), 16000, subtype="PCM_16")
    shard_dataset(src, tmp_path / "out", chunk_seconds=60.0, valid_fraction=0.0, progress=False)
    return wav, tmp_path / "out"
