"""Loader throughput of one worker, in audio-seconds per second, in wall time and in CPU time:

(a) decode ceiling: soundfile on in-memory FLAC chunks, crop by seek, nothing else;
(b) our loader (``make_loader``, autoregressive task: crop by seek from the shard file + mu-law quantization);
(c) a naive per-file torch Dataset that reads each whole WAV file and crops it;
(d) our loader reading the same shards from a local S3 server (moto in its own process on 127.0.0.1,
    ``s3://`` through s3fs: every crop is ranged GETs);
(e) the same with ``data.cache_dir``, on the second epoch (the first filled the cache: indexes and the
    blocks its crops touched), and (f) the first epoch's crops again (every block local);
and the cost of one crop from a 300 s chunk vs a 30 s chunk (should not grow with chunk length).

    OMP_NUM_THREADS=1 python bench/loader.py [--out bench/results/loader.md]

(d)-(f) need the ``dev`` extra (moto[server], s3fs); without it they are left out. moto copies a whole
object to answer each ranged GET, so its shards are cut at 4 MB (``--shard-size``) to keep that cost small;
(d) is still bounded by moto rather than by our reader, and a real store differs (latency, no copy).

The case is issue #13's: 1 s crops of 16 kHz mono, batch 16, 8-bit mu-law, piano-like music (synthetic,
generated in a temporary directory) in 30 s chunks. Takes about a minute. Wall time is what training
waits for; CPU time (``time.process_time``) is what one worker costs and moves less when other jobs share
the machine, so both are reported. Files are in the page cache.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.shard import shard_dataset
from dist_audio.config import DataConfig
from dist_audio.data import make_loader
from dist_audio.data.shards import iter_shard, read_crop
from dist_audio.storage import Store

RATE = 16_000
SEGMENT_SECONDS = 1.0
BATCH = 16
TRACKS, TRACK_SECONDS = 6, 900.0  # 180 chunks of 30 s: one epoch at batch 16 is 11 batches (176 crops)
ROUNDS = 5  # each measurement is repeated, alternating; the best round counts
REMOTE_ROUNDS = 2  # (d)-(f): in the first rounds only (each is 4 epochs against the S3 server)


def piano_track(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Piano-like mono music: struck notes (inharmonic partials, each decaying faster the higher it is),
    two to three onsets a second, over a faint noise floor, so FLAC compresses it as it does a recording."""
    n = int(seconds * RATE)
    note_seconds = 1.5
    t = np.arange(int(note_seconds * RATE)) / RATE
    notes = {}
    for key in range(28, 76):  # E2 .. D#6
        f0 = 440.0 * 2 ** ((key - 49) / 12)
        wave = sum(np.sin(2 * np.pi * f0 * k * np.sqrt(1 + 4e-4 * k * k) * t) * np.exp(-t * (1.5 + 1.2 * k)) / k
                   for k in range(1, 9))
        notes[key] = wave * np.minimum(1.0, t / 0.002)  # a 2 ms attack
    audio = 2e-4 * rng.standard_normal(n)
    for onset in np.cumsum(rng.exponential(0.4, int(seconds / 0.2))):
        start = int(onset * RATE)
        if start >= n:
            break
        wave = notes[int(rng.integers(28, 76))] * rng.uniform(0.05, 0.2)
        audio[start : start + len(wave)] += wave[: n - start]
    return np.clip(audio, -1, 1).astype(np.float32)


def make_sources(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(TRACKS):
        sf.write(root / f"track{i:02d}.wav", piano_track(rng, TRACK_SECONDS), RATE, subtype="PCM_16")
    return root


def timed(work: Callable[[], float]) -> tuple[float, float]:
    """(audio-s per wall-s, audio-s per CPU-s) of ``work``, which returns the audio seconds it produced."""
    wall, cpu = time.perf_counter(), time.process_time()
    seconds = work()
    return seconds / (time.perf_counter() - wall), seconds / (time.process_time() - cpu)


def decode_ceiling(shards: Path, crops: int, rng: np.random.Generator) -> tuple[float, float]:
    """(a) crops straight from FLAC bytes already in memory: the most any loader could do."""
    members = []
    for path in sorted(shards.glob("train-*.tar")):
        with tarfile.open(path) as tar:
            members += [tar.extractfile(m).read() for m in tar if m.name.endswith(".flac")]
    segment = int(SEGMENT_SECONDS * RATE)

    def work() -> float:
        for _ in range(crops):
            with sf.SoundFile(io.BytesIO(members[rng.integers(len(members))])) as f:
                f.seek(int(rng.integers(0, f.frames - segment)))
                f.read(segment, dtype="float32")
        return crops * SEGMENT_SECONDS

    return timed(work)


def our_loader(shards: Path | str, epoch: int, cache_dir: str = "") -> tuple[float, float]:
    """(b) one training epoch of make_loader in this process (num_workers=0 = one worker's work), from the
    first batch on (making the loader, which reads the manifest, is a per-epoch constant left out)."""
    cfg = DataConfig(shards=str(shards), batch_size=BATCH, segment_seconds=SEGMENT_SECONDS, shuffle_buffer=64,
                     bits=8, quantization="mu-law", cache_dir=cache_dir)
    loader = make_loader(cfg, "train", epoch=epoch)  # reads the manifest (and makes an S3 client): not timed
    return timed(lambda: sum(batch["y"].shape[0] for batch in loader) * SEGMENT_SECONDS)


def naive_loader(sources: Path, crops: int, rng: np.random.Generator) -> tuple[float, float]:
    """(c) the common baseline: read the whole file, then cut a random crop."""
    files = sorted(sources.glob("*.wav"))
    segment = int(SEGMENT_SECONDS * RATE)

    def work() -> float:
        for _ in range(crops):
            audio, _ = sf.read(files[rng.integers(len(files))], dtype="float32")
            start = int(rng.integers(0, len(audio) - segment))
            torch.from_numpy(audio[start : start + segment].copy())
        return crops * SEGMENT_SECONDS

    return timed(work)


class LocalS3:
    """moto's S3 server in a child process on 127.0.0.1 (its CPU time is not this process's), reached through
    the standard AWS_* variables."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.2)

    def upload(self, shards: Path, url: str) -> str:
        import boto3

        boto3.client("s3").create_bucket(Bucket=url.split("/")[2])
        store = Store(url)
        for path in sorted(shards.iterdir(), key=lambda p: p.name == "manifest.json"):  # the manifest last
            store.put_file(path, path.name)
        return url

    def close(self) -> None:
        self.process.terminate()
        self.process.wait()


def remote_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("s3fs", "moto", "flask"))


def crop_cost(shards: Path, crops: int, rng: np.random.Generator) -> float:
    """Mean CPU seconds per 1 s crop (read_crop from the shard file, as the loader does)."""
    refs = [r for path in sorted(shards.glob("train-*.tar")) for r in iter_shard(str(path))]
    segment = int(SEGMENT_SECONDS * RATE)
    start_time = time.process_time()
    for _ in range(crops):
        ref = refs[rng.integers(len(refs))]
        read_crop(ref, "audio", int(rng.integers(0, ref.frames - segment)), segment)
    return (time.process_time() - start_time) / crops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="also write the results as markdown to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    loads = [os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = make_sources(tmp / "src")
        options = dict(sample_rate=RATE, channels=1, valid_fraction=0.0, progress=False)
        shard_dataset(sources, tmp / "chunks30", chunk_seconds=30.0, **options)
        shard_dataset(sources, tmp / "chunks300", chunk_seconds=300.0, **options)
        crops = int(TRACKS * TRACK_SECONDS / 30) // BATCH * BATCH  # what one epoch of (b) delivers
        rng = np.random.default_rng(0)
        s3 = LocalS3() if remote_available() else None
        if s3:
            shard_dataset(sources, tmp / "chunks30s", chunk_seconds=30.0, shard_size=4_000_000, **options)
        url = s3.upload(tmp / "chunks30s", "s3://bench/chunks30") if s3 else ""

        def remote(index: int) -> tuple[tuple[float, float], ...]:
            """(d) no cache; (e) second epoch over a cache the first filled; (f) the first epoch again."""
            if not s3 or index >= REMOTE_ROUNDS:
                return ()
            cache = tmp / f"cache{index}"
            our_loader(url, 2 * index, str(cache))  # the first epoch fills the cache
            return our_loader(url, 2 * index + 1), our_loader(url, 2 * index + 1, str(cache)), our_loader(
                url, 2 * index, str(cache))

        # On a shared machine the load changes during the run: alternate the measurements and keep each
        # one's best round, so (a) and (b) are compared under the same conditions.
        rounds = []
        for index in range(ROUNDS):
            rounds.append((decode_ceiling(tmp / "chunks30", crops, rng), our_loader(tmp / "chunks30", index),
                           naive_loader(sources, 10, rng), crop_cost(tmp / "chunks30", crops, rng),
                           crop_cost(tmp / "chunks300", crops, rng), *remote(index)))
            loads.append(os.getloadavg())
        if s3:
            s3.close()
    rates = [[max(r[i][clock] for r in rounds if len(r) > i) for clock in (0, 1)]
             for i in (0, 1, 2, *range(5, len(rounds[0])))]
    ceiling, ours, naive = rates[:3]
    cost30, cost300 = (min(r[i] for r in rounds) for i in (3, 4))
    names = ["(a) decode ceiling (in-memory FLAC, crop by seek)",
             f"(b) our loader (make_loader, 30 s chunks, batch {BATCH}, mu-law, 1 worker)",
             "(c) naive per-file Dataset (whole 900 s WAV read, then crop)",
             "(d) (b) from a local S3 server (moto on 127.0.0.1, s3://, ranged reads, no cache)",
             "(e) (d) with data.cache_dir, second epoch (the first filled the cache)",
             "(f) (d) with data.cache_dir, the first epoch's crops again (all blocks cached)"]
    lines = [
        f"Loader throughput of one worker, audio-seconds per second ({SEGMENT_SECONDS:g} s crops of {RATE // 1000} kHz "
        "mono 16-bit FLAC shards of piano-like music)",
        "",
        "| measurement | audio-s / wall-s | audio-s / CPU-s |",
        "|---|---|---|",
        *[f"| {name} | {wall:,.0f} | {cpu:,.0f} |" for name, (wall, cpu) in zip(names, rates)],
        "",
        f"(b) / (a) = {ours[0] / ceiling[0]:.2f} in wall time, {ours[1] / ceiling[1]:.2f} in CPU time (target ≥ 0.7 "
        f"in wall time); (b) / (c) = {ours[0] / naive[0]:.1f}"
        + (f"; (d) / (b) = {rates[3][0] / ours[0]:.2f}, (e) / (b) = {rates[4][0] / ours[0]:.2f}, "
           f"(f) / (b) = {rates[5][0] / ours[0]:.2f} in wall time (the S3 server's own CPU time is in another "
           "process, not in these CPU-s)" if len(rates) > 3 else "; (d)-(f) left out: pip install -e '.[dev]'"),
        "",
        "| crop cost (1 s crop, from the shard file) | CPU-ms per crop |",
        "|---|---|",
        f"| 30 s chunks | {cost30 * 1e3:.3f} |",
        f"| 300 s chunks | {cost300 * 1e3:.3f} |",
        "",
        f"300 s / 30 s = {cost300 / cost30:.2f} (target ≤ 1.5)",
        "",
        "load average (1, 5, 15 min) at the start and after each round: "
        + "; ".join(" ".join(f"{x:.2f}" for x in load) for load in loads)
        + f" on {os.cpu_count()} cores ({platform.processor() or platform.machine()}); best of {ROUNDS} alternating "
        f"rounds of {crops} crops each ((c): 10 crops; (d)-(f): best of the first {REMOTE_ROUNDS} rounds, "
        "4 MB shards).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text("# Data loader benchmark\n\nCommand: `OMP_NUM_THREADS=1 python bench/loader.py "
                                  f"--out {args.out}`\n\n{text}\n")


if __name__ == "__main__":
    main()
