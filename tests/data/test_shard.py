"""data_prep.shard and data_prep.verify: exact round trip, manifest, splits, rejections, crash safety."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_prep import shard as shard_module
from data_prep.shard import ShardError, shard_dataset
from data_prep.verify import verify

REPO = Path(__file__).resolve().parents[2]


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, suffix = member.name.partition(".")
            samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return samples


def all_samples(out: Path, split: str) -> dict[str, dict[str, bytes]]:
    manifest = json.loads((out / "manifest.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for name in manifest["splits"][split]["shards"]:
        samples.update(read_shard(out / name))
    return samples


def digest(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def test_round_trip_is_bit_exact_for_16_bit_pcm(demo_corpus, speech_shards):
    """Concatenating a track's chunks gives back the source's 16-bit samples exactly."""
    manifest = json.loads((speech_shards / "manifest.json").read_text())
    chunks: dict[str, list[tuple[int, np.ndarray]]] = {}
    for split in ("train", "valid"):
        for members in all_samples(speech_shards, split).values():
            meta = json.loads(members["json"])
            audio, rate = sf.read(io.BytesIO(members["flac"]), dtype="int16", always_2d=True)
            assert rate == 16000 and len(audio) == meta["frames"]
            chunks.setdefault(meta["source"], []).append((meta["start"], audio))
    assert len(chunks) == 12
    min_frames = round(manifest["options"]["min_seconds"] * 16000)
    for source, parts in chunks.items():
        original, _ = sf.read(demo_corpus / "speech" / source, dtype="int16", always_2d=True)
        rebuilt = np.concatenate([a for _, a in sorted(parts, key=lambda p: p[0])])
        kept = len(original) if len(original) % 32000 >= min_frames else len(original) - len(original) % 32000
        np.testing.assert_array_equal(rebuilt, original[:kept])


def test_manifest_counts_and_seconds_match_the_sources(demo_corpus, speech_shards):
    manifest = json.loads((speech_shards / "manifest.json").read_text())
    chunk, min_frames = 32000, 8000  # 2 s chunks, 0.5 s minimum tail at 16 kHz
    expected = {"train": [0, 0], "valid": [0, 0]}  # samples, frames
    for path in sorted((demo_corpus / "speech").rglob("*.wav")):
        frames = sf.info(path).frames
        split = "valid" if shard_module._stable_fraction(path.relative_to(demo_corpus / "speech").as_posix()) < 0.25 \
            else "train"
        full, tail = divmod(frames, chunk)
        expected[split][0] += full + (tail >= min_frames)
        expected[split][1] += full * chunk + (tail if tail >= min_frames else 0)
    for split, (samples, frames) in expected.items():
        entry = manifest["splits"][split]
        assert entry["samples"] == samples == sum(entry["shard_samples"])
        assert entry["seconds"] == pytest.approx(frames / 16000, abs=1e-5)
        assert len(entry["shards"]) > 1  # max_per_shard=4 makes several shards
        assert all(n <= 4 for n in entry["shard_samples"])
    assert manifest["layout"] == "files" and manifest["stems"] == [] and manifest["rejected"] == []
    assert manifest["options"]["chunk_seconds"] == 2.0 and manifest["sample_rate"] == 16000
    assert all(name.startswith("train-") for name in manifest["splits"]["train"]["shards"])
    assert verify(speech_shards) == []


def test_no_track_lands_in_both_splits_and_musdb_keeps_its_split(speech_shards, musdb_shards):
    sources = {s: {json.loads(m["json"])["source"] for m in all_samples(speech_shards, s).values()}
               for s in ("train", "valid")}
    assert sources["train"] and sources["valid"] and not sources["train"] & sources["valid"]

    musdb = {s: {json.loads(m["json"])["source"] for m in all_samples(musdb_shards, s).values()}
             for s in ("train", "valid")}
    assert all(src.startswith("train/") for src in musdb["train"]) and len(musdb["train"]) == 4
    assert all(src.startswith("test/") for src in musdb["valid"]) and len(musdb["valid"]) == 2


def test_musdb_samples_hold_every_stem_and_metadata(musdb_shards):
    manifest = json.loads((musdb_shards / "manifest.json").read_text())
    assert manifest["stems"] == ["drums", "bass", "other", "vocals"] and manifest["channels"] == 2
    members = next(iter(all_samples(musdb_shards, "train").values()))
    assert set(members) == {"json", "mixture.flac", "drums.flac", "bass.flac", "other.flac", "vocals.flac"}
    meta = json.loads(members["json"])
    for field in ("source", "track", "chunk", "start", "frames", "sample_rate", "channels", "stems", "peak", "rms"):
        assert field in meta
    mixture, _ = sf.read(io.BytesIO(members["mixture.flac"]), dtype="int32")
    stems = sum(sf.read(io.BytesIO(members[f"{s}.flac"]), dtype="int32")[0] for s in manifest["stems"])
    assert np.abs(mixture - stems).max() <= 3 * 65536  # the demo mixture is the stems' sum up to rounding
    assert verify(musdb_shards) == []


def test_resampling_channel_conversion_codec_and_shard_size(tmp_path):
    src = tmp_path / "src"
    write_tone(src / "stereo_22k.wav", seconds=3.0, rate=22050, channels=2)
    write_tone(src / "mono_16k.flac", seconds=3.0, rate=16000, channels=1)
    mono = shard_dataset(src, tmp_path / "mono", sample_rate=16000, channels=1, chunk_seconds=1.0, codec="wav",
                         valid_fraction=0.0, shard_size=80_000, progress=False)
    assert mono["splits"]["train"]["samples"] == 6 and mono["splits"]["train"]["seconds"] == pytest.approx(6.0)
    assert all((tmp_path / "mono" / name).stat().st_size <= 80_000 for name in mono["splits"]["train"]["shards"])
    assert len(mono["splits"]["train"]["shards"]) == 3  # two 1 s samples (~34 kB each) fit in 80 kB
    for members in all_samples(tmp_path / "mono", "train").values():
        audio, rate = sf.read(io.BytesIO(members["wav"]), always_2d=True)
        assert rate == 16000 and audio.shape == (16000, 1)
        assert 0.25 < np.abs(audio).max() < 0.35  # the 0.3 tone survives resampling and downmixing

    stereo = shard_dataset(src, tmp_path / "stereo", sample_rate=16000, channels=2, chunk_seconds=3.0,
                           valid_fraction=0.0, progress=False)
    assert stereo["channels"] == 2
    for members in all_samples(tmp_path / "stereo", "train").values():
        audio, _ = sf.read(io.BytesIO(members["flac"]), dtype="int16")
        assert audio.shape == (48000, 2)
        np.testing.assert_array_equal(audio[:, 0], audio[:, 1])  # mono duplicated, stereo tone identical


# --------------------------------------------------------------------------------------------------
# rejected inputs
# --------------------------------------------------------------------------------------------------


def write_tone(path: Path, seconds: float = 1.5, rate: int = 16000, channels: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 220 * t)
    sf.write(path, np.repeat(tone[:, None], channels, axis=1), rate, subtype="PCM_16")


def test_every_bad_file_is_rejected_with_its_reason(tmp_path):
    src = tmp_path / "src"
    write_tone(src / "good.wav")
    (src / "empty.wav").write_bytes(b"")
    sf.write(src / "no_frames.wav", np.zeros((0, 1)), 16000, subtype="PCM_16")
    write_tone(src / "cut.wav")
    data = (src / "cut.wav").read_bytes()
    (src / "cut.wav").write_bytes(data[: len(data) // 2])
    write_tone(src / "cut_flac.flac", seconds=3)
    data = (src / "cut_flac.flac").read_bytes()
    (src / "cut_flac.flac").write_bytes(data[: len(data) // 2])
    (src / "notes.txt").write_text("not audio at all\n" * 10)
    write_tone(src / "short.wav", seconds=0.2)

    manifest = shard_dataset(src, tmp_path / "out", sample_rate=16000, channels=1, valid_fraction=0.0, progress=False)
    reasons = {r["source"]: r["reason"] for r in manifest["rejected"]}
    assert set(reasons) == {"empty.wav", "no_frames.wav", "cut.wav", "cut_flac.flac", "notes.txt", "short.wav"}
    assert reasons["empty.wav"].startswith("zero-length")
    assert reasons["no_frames.wav"].startswith("zero-length")
    assert reasons["cut.wav"].startswith("truncated")
    assert reasons["cut_flac.flac"].startswith("truncated")
    assert reasons["notes.txt"].startswith("not audio")
    assert reasons["short.wav"].startswith("too short")
    assert manifest["splits"]["train"]["samples"] == 1
    assert verify(tmp_path / "out") == []


def test_bad_musdb_tracks_are_rejected_with_their_reason(tmp_path):
    src = tmp_path / "musdb"
    stems = ("mixture", "drums", "bass", "other", "vocals")
    for name in stems:
        write_tone(src / "train" / "good" / f"{name}.wav", channels=2)
        write_tone(src / "test" / "good" / f"{name}.wav", channels=2)
        if name != "vocals":
            write_tone(src / "train" / "missing" / f"{name}.wav", channels=2)
        write_tone(src / "train" / "uneven" / f"{name}.wav", seconds=2.0 if name == "bass" else 1.5, channels=2)
        write_tone(src / "train" / "rates" / f"{name}.wav", rate=22050 if name == "drums" else 16000, channels=2)

    manifest = shard_dataset(src, tmp_path / "out", layout="musdb", sample_rate=16000, channels=2, progress=False)
    reasons = {r["source"]: r["reason"] for r in manifest["rejected"]}
    assert reasons["train/missing"] == "missing stem(s): vocals"
    assert reasons["train/uneven"].startswith("stems have unequal lengths") and "bass 32000 frames" in reasons[
        "train/uneven"]
    assert reasons["train/rates"].startswith("stems have different sample rates") and "22050" in reasons["train/rates"]
    assert manifest["splits"]["train"]["samples"] == 1 and manifest["splits"]["valid"]["samples"] == 1


def run_cli(*args: str, module: str = "data_prep.shard") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_cli_strict_and_no_usable_audio_fail_with_a_message_not_a_traceback(tmp_path):
    src = tmp_path / "src"
    write_tone(src / "a.wav")
    (src / "b.wav").write_bytes(b"RIFF....garbage")

    lenient = run_cli(str(src), str(tmp_path / "lenient"), "--no-progress")
    assert lenient.returncode == 0, lenient.stderr
    assert "rejected 1 input(s)" in lenient.stderr and "b.wav: not audio" in lenient.stderr

    strict = run_cli(str(src), str(tmp_path / "strict"), "--strict", "--no-progress")
    assert strict.returncode == 1
    assert "--strict: rejected b.wav: not audio" in strict.stderr and "Traceback" not in strict.stderr
    assert not list((tmp_path / "strict").iterdir()), "a failed strict run leaves nothing behind"

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "readme.txt").write_text("hello")
    nothing = run_cli(str(junk), str(tmp_path / "nothing"), "--no-progress")
    assert nothing.returncode == 1 and "no usable audio" in nothing.stderr and "Traceback" not in nothing.stderr

    missing = run_cli(str(tmp_path / "nowhere"), str(tmp_path / "x"))
    assert missing.returncode == 1 and "is not a directory" in missing.stderr


# --------------------------------------------------------------------------------------------------
# crash safety and re-runs
# --------------------------------------------------------------------------------------------------


def test_complete_out_is_left_alone_different_data_refused_overwrite_rebuilds(demo_corpus, tmp_path, capsys):
    options = dict(layout="musdb", sample_rate=16000, channels=2, chunk_seconds=4.0, max_per_shard=3, progress=False)
    out = tmp_path / "out"
    first = shard_dataset(demo_corpus / "musdb", out, **options)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = shard_dataset(demo_corpus / "musdb", out, **options)
    assert "already complete" in capsys.readouterr().err
    assert again == first and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    with pytest.raises(ShardError, match=r"different dataset \(options differ: chunk_seconds 4.0 → 5.0\)"):
        shard_dataset(demo_corpus / "musdb", out, **{**options, "chunk_seconds": 5.0})
    with pytest.raises(ShardError, match="different dataset"):
        shard_dataset(demo_corpus / "speech", out, progress=False)
    rebuilt = shard_dataset(demo_corpus / "musdb", out, **{**options, "chunk_seconds": 5.0, "overwrite": True})
    assert rebuilt["options"]["chunk_seconds"] == 5.0 and verify(out) == []

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.pdf").write_text("precious")
    with pytest.raises(ShardError, match=r"not made by data_prep\.shard"):
        shard_dataset(demo_corpus / "musdb", foreign, **{**options, "overwrite": True})
    assert (foreign / "thesis.pdf").read_text() == "precious"


def test_output_does_not_depend_on_the_worker_count(demo_corpus, musdb_shards, tmp_path):
    out = tmp_path / "two_workers"
    shard_dataset(demo_corpus / "musdb", out, layout="musdb", sample_rate=16000, channels=2, chunk_seconds=4.0,
                  min_seconds=1.0, max_per_shard=3, workers=2, progress=False)
    assert digest(out) == digest(musdb_shards)


_SLOW_SHARD = textwrap.dedent("""
    import sys, time
    from data_prep import shard
    add = shard._ShardWriter.add
    def slow_add(self, sample):
        time.sleep(0.15)
        add(self, sample)
    shard._ShardWriter.add = slow_add
    sys.exit(shard.main(sys.argv[1:]))
""")


def test_killed_run_is_never_complete_and_a_rerun_finishes_it(demo_corpus, tmp_path):
    args = [str(demo_corpus / "musdb"), str(tmp_path / "out"), "--layout", "musdb", "--sample-rate", "16000",
            "--channels", "2", "--chunk-seconds", "4", "--max-per-shard", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SHARD, *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (tmp_path / "out" / "train-000001.tar").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = tmp_path / "out"
    assert (out / "train-000000.tar").exists() and not (out / "manifest.json").exists()
    problems = verify(out)
    assert problems and "did not finish" in problems[0]
    assert run_cli(str(out), module="data_prep.verify").returncode == 1

    rerun = run_cli(*args)
    assert rerun.returncode == 0 and "unfinished run" in rerun.stderr
    assert verify(out) == []
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    reference = tmp_path / "reference"
    assert run_cli(*[reference.as_posix() if a == str(out) else a for a in args]).returncode == 0
    assert digest(out) == digest(reference)


def test_disk_full_removes_the_partial_output(demo_corpus, small_disk):
    """Shards written to a real 8 MB tmpfs filled up to a few hundred KB: the filesystem refuses a shard
    part-way (ENOSPC), one clear error, nothing left behind; with the space back the same call succeeds."""
    filler = small_disk.fill(leave=300_000)
    out = small_disk.path / "out"
    with pytest.raises(ShardError, match=r"disk full while writing shards.*partial output .* was removed"):
        shard_dataset(demo_corpus / "musdb", out, layout="musdb", sample_rate=16000, channels=2, chunk_seconds=4.0,
                      max_per_shard=2, progress=False)
    assert not out.exists() or list(out.iterdir()) == []
    filler.unlink()
    manifest = shard_dataset(demo_corpus / "musdb", out, layout="musdb", sample_rate=16000, channels=2,
                             chunk_seconds=4.0, max_per_shard=2, progress=False)
    assert manifest["splits"]["train"]["samples"] > 0 and verify(out) == []
    assert sum(f.stat().st_size for f in out.rglob("*")) > 300_000  # more than the space that was left


def test_verify_rejects_a_damaged_shard_directory(speech_shards, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(speech_shards, out)
    first = json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"][0]
    data = (out / first).read_bytes()
    (out / first).write_bytes(data[: len(data) // 2])
    assert any(first in p for p in verify(out))
    (out / first).unlink()
    assert any(f"{first}: missing" in p for p in verify(out))
