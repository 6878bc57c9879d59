"""Shards on object storage, against real loopback servers: moto's S3 server and an HTTP server honouring
Range. Upload, verify, identical batches from a URL and from the local copy, ranged crops, retries on 503s
counted, the cache, and URLs the system cannot handle refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_prep.shard import ShardError, shard_dataset
from data_prep.verify import verify
from dist_audio.config import ConfigError, DataConfig
from dist_audio.data import make_loader
from dist_audio.data.manifest import read_manifest
from dist_audio.data.shards import ShardReader, ShardSource, iter_shard
from dist_audio.storage import DiskCache, SourceUnavailable, Store, parse_location, take_retries

REPO = Path(__file__).resolve().parents[2]
SPEECH = dict(layout="files", sample_rate=16000, channels=1, chunk_seconds=2.0, min_seconds=0.5,
              valid_fraction=0.25, max_per_shard=4, progress=False)  # as the speech_shards fixture
MUSDB = dict(layout="musdb", sample_rate=16000, channels=2, chunk_seconds=4.0, min_seconds=1.0, max_per_shard=3,
             progress=False)  # as the musdb_shards fixture


def speech(shards: str | Path, **overrides) -> DataConfig:
    return DataConfig(**{"shards": str(shards), "batch_size": 3, "segment_seconds": 0.5, "shuffle_buffer": 8,
                         **overrides})


def musdb(shards: str | Path, **overrides) -> DataConfig:
    return DataConfig(**{"shards": str(shards), "task": "separation", "batch_size": 2, "segment_seconds": 0.5,
                         "shuffle_buffer": 8, **overrides})


def same_batches(a: list[dict], b: list[dict]) -> bool:
    """Bit-identical tensors and keys (counters such as remote_retries aside)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        for name in set(x) - {"remote_retries", "skipped"}:
            if name == "keys":
                if x[name] != y[name]:
                    return False
            elif not (x[name].dtype == y[name].dtype and np.array_equal(x[name].numpy(), y[name].numpy())):
                return False
    return True


@pytest.mark.parametrize("text", ["ftp://host/shards", "s3:/bucket/sc09", "s3:bucket", "s3://", "file:///x",
                                  "s3://AKIA:secret@bucket/x"])
def test_urls_the_system_cannot_handle_are_refused(text):
    with pytest.raises(ValueError):
        parse_location(text)
    with pytest.raises(ConfigError) as err:
        read_manifest(text)
    assert err.value.key == "data.shards"
    with pytest.raises(ConfigError) as err:
        DataConfig(shards=text).validate("data")
    assert err.value.key == "data.shards"


def test_shard_to_an_unusable_url_writes_nothing_locally(tmp_path, demo_corpus):
    """The bug of issue 15: `s3:/bucket/sc09` used to become a local folder `s3:`."""
    done = subprocess.run([sys.executable, "-m", "data_prep.shard", str(demo_corpus / "speech"), "s3:/bucket/sc09",
                           "--no-progress"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1 and "not a valid URL" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ShardError, match="read-only"):
        shard_dataset(demo_corpus / "speech", "http://127.0.0.1:9/x", **SPEECH)


def test_shard_upload_verify_and_identical_batches_from_s3(demo_corpus, speech_shards, s3_bucket):
    url = f"{s3_bucket}/speech"
    manifest = shard_dataset(demo_corpus / "speech", url, **SPEECH)
    store = Store(url)
    local = sorted(p.name for p in Path(speech_shards).iterdir())
    assert store.list() == local  # the same shards and the manifest, nothing else left behind
    assert all(store.read(name) == (Path(speech_shards) / name).read_bytes() for name in local if name.endswith(".tar"))
    assert verify(url) == []
    assert shard_dataset(demo_corpus / "speech", url, **SPEECH) == manifest  # complete: nothing to do
    for split in ("train", "valid"):
        from_s3 = list(make_loader(speech(url, num_workers=1), split, seed=1, epoch=1))
        from_disk = list(make_loader(speech(speech_shards), split, seed=1, epoch=1))
        assert same_batches(from_s3, from_disk) and len(from_s3) > 0


def test_an_interrupted_upload_never_looks_complete_and_a_rerun_finishes_it(tmp_path, demo_corpus, s3_bucket):
    """A run that stops half way (here: --strict meets a corrupt file late in the source order) leaves no
    manifest: verify fails, the loader refuses; once the input is fixed, the same command uploads only what
    is missing."""
    src = tmp_path / "src"
    src.mkdir()
    for path in sorted(p for p in (demo_corpus / "speech").rglob("*.wav"))[:6]:
        (src / path.name).write_bytes(path.read_bytes())
    (src / "zz-broken.wav").write_bytes(b"RIFF not really audio")
    url = f"{s3_bucket}/part"
    options = {**SPEECH, "valid_fraction": 0.0, "max_per_shard": 1, "strict": True}
    with pytest.raises(ShardError, match=r"rejected zz-broken\.wav"):
        shard_dataset(src, url, **options)
    store = Store(url)
    uploaded = [n for n in store.list() if n.endswith(".tar")]
    assert uploaded and "manifest.json" not in store.list()
    assert "no manifest.json" in verify(url)[0]
    with pytest.raises(ConfigError, match=r"no manifest\.json"):
        make_loader(speech(url), "train")
    import boto3

    bucket, prefix = url[len("s3://"):].split("/", 1)
    client = boto3.client("s3")
    stamps = {n: client.head_object(Bucket=bucket, Key=f"{prefix}/{n}")["LastModified"] for n in uploaded}
    (src / "zz-broken.wav").unlink()
    shard_dataset(src, url, **options)
    assert verify(url) == []
    assert all(client.head_object(Bucket=bucket, Key=f"{prefix}/{n}")["LastModified"] == t for n, t in stamps.items())
    assert len([n for n in store.list() if n.endswith(".tar")]) > len(uploaded)


def test_a_crop_over_http_fetches_only_its_own_bytes(long_chunk_shards, range_server):
    """1 s out of a 60 s chunk: a small fraction of the member crosses the wire, and the samples are exact."""
    wav, shards = long_chunk_shards
    server = range_server(shards)
    source = ShardSource(Store(server.url))
    path = f"{server.url}/train-000000.tar"
    ref = next(iter(iter_shard(path, 1, source)))
    indexing = server.bytes_sent
    assert indexing < 20_000  # the index: headers and metadata, not the member
    with ShardReader(source=source) as reader:
        crop = reader.read_crop(ref, "audio", 16000 * 40, 16000)
    assert 0 < server.bytes_sent - indexing < 0.2 * ref.members["audio"][1]
    full, _ = sf.read(wav, dtype="float32")
    np.testing.assert_array_equal(crop[0], full[16000 * 40 : 16000 * 41])


def test_503s_are_retried_and_counted(speech_shards, range_server):
    """Every 4th request answered 503: the batches are still exactly the local ones, and the retries the
    batches report add up to the 503s the server sent."""
    take_retries()
    server = range_server(speech_shards, fail_every=4)
    batches = list(make_loader(speech(server.url), "train", seed=2))
    assert same_batches(batches, list(make_loader(speech(speech_shards), "train", seed=2)))
    counted = sum(int(b["remote_retries"]) for b in batches) + take_retries()  # + the manifest's, read first
    assert server.failures > 5 and counted == server.failures


def test_the_cache_serves_a_second_pass_without_requests(tmp_path, speech_shards, musdb_shards, range_server):
    for shards, config in ((speech_shards, speech), (musdb_shards, musdb)):
        server = range_server(shards)
        cfg = config(server.url, cache_dir=str(tmp_path / "cache"), cache_max_gib=1.0)
        first = list(make_loader(cfg, "train", seed=4))
        requests = server.requests
        second = list(make_loader(cfg, "train", seed=4))
        assert server.requests - requests == 1  # the manifest; indexes and blocks come from the cache
        assert same_batches(first, second) and same_batches(first, list(make_loader(config(shards), "train", seed=4)))
        later = list(make_loader(cfg, "train", seed=4, epoch=1))  # other crops: what is missing is fetched
        assert same_batches(later, list(make_loader(config(shards), "train", seed=4, epoch=1)))


def test_the_disk_cache_stays_within_its_limit(tmp_path):
    cache = DiskCache(tmp_path, max_bytes=100_000)
    for i in range(30):
        cache.put(f"k{i}", bytes([i]) * 10_000)
        cache.evict()
    sizes = [p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()]
    assert sum(sizes) <= 100_000 and cache.get("k29") == bytes([29]) * 10_000 and cache.get("k0") is None


def test_webdataset_reads_our_shards_locally_and_over_http(speech_shards, musdb_shards, range_server):
    """Stock webdataset.WebDataset: one sample per key, members named by their suffix, as docs/data.md says."""
    webdataset = pytest.importorskip("webdataset")
    for shards, members in ((speech_shards, {"json", "flac"}),
                            (musdb_shards, {"json", "mixture.flac", "drums.flac", "bass.flac", "other.flac",
                                            "vocals.flac"})):
        manifest = json.loads((Path(shards) / "manifest.json").read_text())
        names = manifest["splits"]["train"]["shards"]
        server = range_server(shards)
        over_http = [[f"{server.url}/{n}" for n in names]] if shutil.which("curl") else []  # webdataset's http
        for urls in [[str(Path(shards) / n) for n in names], *over_http]:
            samples = list(webdataset.WebDataset(urls, shardshuffle=False))
            assert len(samples) == manifest["splits"]["train"]["samples"]
            for sample in samples:
                assert set(sample) - {"__key__", "__url__", "__local_path__"} == members
                meta = json.loads(sample["json"])
                audio, rate = sf.read(__import__("io").BytesIO(sample[sorted(members - {"json"})[0]]))
                assert rate == 16000 and len(audio) == meta["frames"] and "." not in sample["__key__"]


def test_a_source_down_stops_a_worker_loader_with_one_line_naming_it(speech_shards, range_server):
    """With DataLoader workers too: SourceUnavailable after data.remote_timeout_s, its message one line."""
    server = range_server(speech_shards)
    loader = make_loader(speech(server.url, num_workers=1, remote_timeout_s=1.0), "train")  # manifest read
    server.stop()
    started = time.monotonic()
    with pytest.raises(SourceUnavailable) as err:
        list(loader)
    message = str(err.value)
    assert message.startswith(f"data source {server.url}/train-") and "unreachable for 1 s" in message
    assert "last error:" in message and len(message.splitlines()) == 1
    assert time.monotonic() - started < 30
