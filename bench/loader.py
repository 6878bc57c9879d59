"""Loader throughput, in audio-seconds delivered per CPU-second of one process (one worker):

(a) decode ceiling: soundfile on in-memory FLAC chunks, crop by seek, nothing else;
(b) our loader (``make_loader``, autoregressive task: crop by seek from the shard file + quantization);
(c) a naive per-file torch Dataset that reads each whole WAV file and crops it;
and the cost of one crop from a 300 s chunk vs a 30 s chunk (should not grow with chunk length).

    OMP_NUM_THREADS=1 python bench/loader.py [--out bench/results/loader.md]

Synthetic 44.1 kHz stereo audio is generated in a temporary directory; takes about a minute.
Times are the process's CPU time (``time.process_time``): on a shared machine wall time mostly measures
the other tenants, while CPU time is what one loader worker costs. Files are in the page cache.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.shard import shard_dataset
from dist_audio.config import DataConfig
from dist_audio.data import make_loader
from dist_audio.data.shards import iter_shard, read_crop

RATE = 44_100
SEGMENT_SECONDS = 1.0
CROPS = 150  # crops per measurement
ROUNDS = 3  # each measurement is repeated; the best round counts


def synthetic_track(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Music-like stereo: a few drifting partials plus some noise (FLAC compresses it like real audio)."""
    t = np.arange(int(seconds * RATE)) / RATE
    tone = sum(np.sin(2 * np.pi * f * t * (1 + 0.001 * np.sin(0.5 * t))) / (i + 1)
               for i, f in enumerate(rng.uniform(80, 2000, 6)))
    left = 0.15 * tone + 0.02 * rng.standard_normal(len(t))
    right = 0.15 * np.roll(tone, 50) + 0.02 * rng.standard_normal(len(t))
    return np.stack([left, right], axis=1).astype(np.float32)


def make_sources(root: Path, tracks: int, seconds: float, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(tracks):
        sf.write(root / f"track{i:02d}.wav", synthetic_track(rng, seconds), RATE, subtype="PCM_16")
    return root


def rate(audio_seconds: float, elapsed: float) -> float:
    return audio_seconds / elapsed


def decode_ceiling(shards: Path, rng: np.random.Generator) -> float:
    """(a) crops straight from FLAC bytes already in memory: the most any loader could do."""
    members = []
    for path in sorted(shards.glob("train-*.tar")):
        with tarfile.open(path) as tar:
            members += [tar.extractfile(m).read() for m in tar if m.name.endswith(".flac")]
    segment = int(SEGMENT_SECONDS * RATE)
    start_time = time.process_time()
    for _ in range(CROPS):
        data = members[rng.integers(len(members))]
        with sf.SoundFile(io.BytesIO(data)) as f:
            f.seek(int(rng.integers(0, f.frames - segment)))
            f.read(segment, dtype="float32")
    return rate(CROPS * SEGMENT_SECONDS, time.process_time() - start_time)


def our_loader(shards: Path) -> float:
    """(b) make_loader in this process (num_workers=0 = one worker's work)."""
    cfg = DataConfig(shards=str(shards), batch_size=10, segment_seconds=SEGMENT_SECONDS, shuffle_buffer=64,
                     epoch_batches=CROPS // 10)
    start_time = time.process_time()
    count = sum(batch["y"].shape[0] for batch in make_loader(cfg, "train"))
    return rate(count * SEGMENT_SECONDS, time.process_time() - start_time)


class NaiveFileDataset(torch.utils.data.Dataset):
    """(c) the common baseline: read the whole file, then cut a random crop."""

    def __init__(self, files: list[Path], seed: int = 0):
        self.files, self.rng = files, np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        audio, _ = sf.read(self.files[index], dtype="float32", always_2d=True)
        segment = int(SEGMENT_SECONDS * RATE)
        start = int(self.rng.integers(0, len(audio) - segment))
        return torch.from_numpy(audio[start : start + segment].T.copy())


def naive_loader(sources: Path, rng: np.random.Generator) -> float:
    dataset = NaiveFileDataset(sorted(sources.glob("*.wav")))
    count = CROPS // 15  # whole-file reads are slow; fewer crops keep the benchmark short
    start_time = time.process_time()
    for _ in range(count):
        dataset[int(rng.integers(len(dataset)))]
    return rate(count * SEGMENT_SECONDS, time.process_time() - start_time)


def crop_cost(shards: Path, rng: np.random.Generator) -> float:
    """Mean seconds per 1 s crop (read_crop from the shard file, as the loader does)."""
    refs = [r for path in sorted(shards.glob("train-*.tar")) for r in iter_shard(str(path))]
    segment = int(SEGMENT_SECONDS * RATE)
    start_time = time.process_time()
    for _ in range(CROPS):
        ref = refs[rng.integers(len(refs))]
        read_crop(ref, "audio", int(rng.integers(0, ref.frames - segment)), segment)
    return (time.process_time() - start_time) / CROPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="also write the results as markdown to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = make_sources(tmp / "src", tracks=3, seconds=300.0)
        options = dict(sample_rate=RATE, channels=2, valid_fraction=0.0, progress=False)
        shard_dataset(sources, tmp / "chunks30", chunk_seconds=30.0, **options)
        shard_dataset(sources, tmp / "chunks300", chunk_seconds=300.0, **options)
        rng = np.random.default_rng(0)
        # On a shared machine the load changes during the run: alternate the measurements and keep each
        # one's best round, so (a) and (b) are compared under the same conditions.
        rounds = [(decode_ceiling(tmp / "chunks30", rng), our_loader(tmp / "chunks30"), naive_loader(sources, rng),
                   crop_cost(tmp / "chunks30", rng), crop_cost(tmp / "chunks300", rng)) for _ in range(ROUNDS)]
        ceiling, ours, naive = (max(r[i] for r in rounds) for i in range(3))
        cost30, cost300 = (min(r[i] for r in rounds) for i in (3, 4))
        results = {
            "(a) decode ceiling (in-memory FLAC, crop by seek)": ceiling,
            "(b) our loader (make_loader, 30 s chunks, 1 worker)": ours,
            "(c) naive per-file Dataset (whole 300 s WAV read, then crop)": naive,
        }

    load = os.getloadavg()
    ceiling_fraction, over_naive = ours / ceiling, ours / naive
    lines = [
        f"Loader throughput, audio-seconds per CPU-second of one worker ({SEGMENT_SECONDS:g} s crops of 44.1 kHz "
        "stereo "
        "16-bit FLAC shards)",
        "",
        "| measurement | audio-s / CPU-s |",
        "|---|---|",
        *[f"| {name} | {value:,.0f} |" for name, value in results.items()],
        "",
        f"(b) / (a) = {ceiling_fraction:.2f} (target ≥ 0.7); (b) / (c) = {over_naive:.1f}",
        "",
        "| crop cost (1 s crop, from the shard file) | CPU-ms per crop |",
        "|---|---|",
        f"| 30 s chunks | {cost30 * 1e3:.2f} |",
        f"| 300 s chunks | {cost300 * 1e3:.2f} |",
        "",
        f"300 s / 30 s = {cost300 / cost30:.2f} (target ≤ 1.5)",
        "",
        f"load average during the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores "
        f"({platform.processor() or platform.machine()}); best of {ROUNDS} alternating rounds of {CROPS} crops each; "
        "figures are provisional when the machine is shared.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text("# Data loader benchmark\n\nCommand: `OMP_NUM_THREADS=1 python bench/loader.py "
                                  f"--out {args.out}`\n\n{text}\n")


if __name__ == "__main__":
    main()
