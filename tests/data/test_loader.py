"""dist_audio.data.make_loader: batch contract, exact-once validation across ranks and workers, equal
batch counts, deterministic order and resume, crop by seek, remix."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from data_prep.shard import shard_dataset
from dist_audio.config import ConfigError, DataConfig
from dist_audio.data import make_loader, quantize, valid_crop_starts, zero_level
from dist_audio.data import shards as shards_module


def speech_config(shards: Path, **overrides) -> DataConfig:
    return DataConfig(**{"shards": str(shards), "batch_size": 3, "segment_seconds": 0.5, "shuffle_buffer": 8,
                         **overrides})


def musdb_config(shards: Path, **overrides) -> DataConfig:
    return DataConfig(**{"shards": str(shards), "task": "separation", "batch_size": 2, "segment_seconds": 0.5,
                         "shuffle_buffer": 8, **overrides})


def all_chunks(shards: Path, split: str) -> dict[str, dict]:
    """key → JSON metadata of every sample of a split, read straight from the tar files."""
    manifest = json.loads((shards / "manifest.json").read_text())
    chunks = {}
    for name in manifest["splits"][split]["shards"]:
        with tarfile.open(shards / name) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    chunks[member.name[: -len(".json")]] = json.loads(tar.extractfile(member).read())
    return chunks


def decode_member(shards: Path, key: str, suffix: str) -> np.ndarray:
    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            if f"{key}.{suffix}" in tar.getnames():
                return sf.read(io.BytesIO(tar.extractfile(f"{key}.{suffix}").read()), dtype="float32",
                               always_2d=True)[0].T
    raise KeyError(key)


def test_autoregressive_batches_follow_the_contract(speech_shards):
    cfg = speech_config(speech_shards, bits=8, quantization="mu-law")
    loader = make_loader(cfg, "train")
    batches = list(loader)
    assert len(batches) == len(loader) == len(all_chunks(speech_shards, "train")) // 3  # samples // batch size
    for batch in batches:
        assert batch["x"].shape == batch["y"].shape == (3, 8000) and batch["x"].dtype == torch.long
        assert torch.all(batch["x"][:, 0] == zero_level(8, "mu-law"))
        assert torch.equal(batch["x"][:, 1:], batch["y"][:, :-1])
        assert len(batch["keys"]) == 3 and batch["skipped"].item() == 0 and "mask" not in batch
    # the targets are the quantized audio of the crop the key names, decoded from the shard directly
    key, start = batches[0]["keys"][0].split("@")
    audio = decode_member(speech_shards, key, "flac")[0, int(start) : int(start) + 8000]
    assert torch.equal(batches[0]["y"][0], quantize(torch.from_numpy(audio), 8, "mu-law"))


def test_stereo_interleaving_doubles_the_sequence(musdb_shards):
    cfg = DataConfig(shards=str(musdb_shards), batch_size=2, segment_seconds=0.25, interleave_stereo=True,
                     quantization="linear")
    batch = next(iter(make_loader(cfg, "valid")))
    assert batch["y"].shape == (2, 8000)
    key, start = batch["keys"][0].split("@")
    mixture = decode_member(musdb_shards, key, "mixture.flac")[:, int(start) : int(start) + 4000]
    assert torch.equal(batch["y"][0, 0::2], quantize(torch.from_numpy(mixture[0]), 8, "linear"))
    assert torch.equal(batch["y"][0, 1::2], quantize(torch.from_numpy(mixture[1]), 8, "linear"))
    with pytest.raises(ConfigError, match="interleave_stereo"):
        make_loader(DataConfig(shards=str(musdb_shards).replace("musdb", "speech"), interleave_stereo=True), "train")


def valid_epoch(cfg: DataConfig, world_size: int) -> tuple[list[int], list[str], list[dict]]:
    lengths, keys, batches = [], [], []
    for rank in range(world_size):
        loader = make_loader(cfg, "valid", rank=rank, world_size=world_size)
        rank_batches = list(loader)
        assert len(rank_batches) == len(loader)
        lengths.append(len(rank_batches))
        batches += rank_batches
        for batch in rank_batches:
            assert batch["mask"].dtype == torch.bool
            keys += [k for k, real in zip(batch["keys"], batch["mask"].tolist()) if real]
            assert all(k == "" for k, real in zip(batch["keys"], batch["mask"].tolist()) if not real)
    return lengths, keys, batches


@pytest.mark.parametrize("task", ["autoregressive", "separation"])
def test_validation_visits_every_crop_once_across_two_ranks_and_two_workers(speech_shards, musdb_shards, task):
    shards = speech_shards if task == "autoregressive" else musdb_shards
    make_cfg = speech_config if task == "autoregressive" else musdb_config
    cfg = make_cfg(shards, num_workers=2, segment_seconds=0.75)
    lengths, keys, _ = valid_epoch(cfg, world_size=2)
    assert lengths[0] == lengths[1] > 0
    expected = [f"{key}@{start}" for key, meta in all_chunks(shards, "valid").items()
                for start in valid_crop_starts(meta["frames"], 12000)]
    assert sorted(keys) == sorted(expected)  # every crop exactly once, no duplicates
    chunk_keys = {k.split("@")[0] for k in keys}
    assert chunk_keys == set(all_chunks(shards, "valid"))  # every sample visited


def test_validation_batches_do_not_depend_on_workers_or_ranks_layout(speech_shards):
    _, keys_single, batches_single = valid_epoch(speech_config(speech_shards), world_size=1)
    _, keys_workers, batches_workers = valid_epoch(speech_config(speech_shards, num_workers=2), world_size=1)
    assert keys_single == keys_workers
    for a, b in zip(batches_single, batches_workers):
        assert torch.equal(a["y"], b["y"]) and torch.equal(a["mask"], b["mask"])


def test_valid_crops_cover_each_chunk():
    assert valid_crop_starts(100, 30) == [0, 30, 60, 70]
    assert valid_crop_starts(90, 30) == [0, 30, 60]
    assert valid_crop_starts(20, 30) == [0]
    for frames in range(1, 200, 7):
        starts = valid_crop_starts(frames, 30)
        covered = set()
        for s in starts:
            covered |= set(range(s, min(s + 30, frames)))
        assert covered == set(range(frames)) and starts == sorted(set(starts))


def train_keys(cfg: DataConfig, **kwargs) -> list[list[str]]:
    return [batch["keys"] for batch in make_loader(cfg, "train", **kwargs)]


def test_train_ranks_get_equal_batch_counts_and_a_deterministic_order(speech_shards):
    cfg = speech_config(speech_shards, num_workers=2, epoch_batches=5)
    per_rank = [train_keys(cfg, rank=r, world_size=2, seed=1) for r in range(2)]
    assert [len(k) for k in per_rank] == [5, 5]
    assert per_rank[0] == train_keys(cfg, rank=0, world_size=2, seed=1)  # same order when run again
    assert per_rank[0] != train_keys(cfg, rank=0, world_size=2, seed=1, epoch=1)  # new order each epoch
    # default epoch length: train samples // (batch size × world size), equal on both ranks
    default = speech_config(speech_shards)
    expected = len(all_chunks(speech_shards, "train")) // 6
    assert [len(make_loader(default, "train", rank=r, world_size=2)) for r in range(2)] == [expected] * 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_start_batch_resumes_exactly(speech_shards, musdb_shards, num_workers):
    cfg = speech_config(speech_shards, num_workers=num_workers, epoch_batches=7)
    full = list(make_loader(cfg, "train", seed=3, epoch=2))
    resumed = make_loader(cfg, "train", seed=3, epoch=2, start_batch=3)
    assert len(resumed) == 4
    for a, b in zip(full[3:], resumed, strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["x"], b["x"])
    sep = musdb_config(musdb_shards, num_workers=num_workers, epoch_batches=4)
    full = list(make_loader(sep, "train"))
    for a, b in zip(full[1:], make_loader(sep, "train", start_batch=1), strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["stems"], b["stems"])
    valid_full = list(make_loader(cfg, "valid"))
    valid_resumed = list(make_loader(cfg, "valid", start_batch=2))
    assert [b["keys"] for b in valid_full[2:]] == [b["keys"] for b in valid_resumed]


def test_remixed_mixture_is_the_sum_of_stems_from_different_chunks(musdb_shards):
    cfg = musdb_config(musdb_shards, batch_size=4, epoch_batches=3, remix_gain=[0.5, 1.5])
    for batch in make_loader(cfg, "train"):
        assert batch["mixture"].shape == (4, 2, 8000) and batch["stems"].shape == (4, 4, 2, 8000)
        torch.testing.assert_close(batch["mixture"], batch["stems"].sum(dim=1), rtol=0, atol=1e-6)
        for key in batch["keys"]:
            assert len(key.split("+")) == 4  # one (chunk, offset) per stem
    # each remixed stem is ± gain × a crop of that stem, possibly with its channels swapped
    key, start = batch["keys"][0].split("+")[0].split("@")
    drums = decode_member(musdb_shards, key, "drums.flac")[:, int(start) : int(start) + 8000]
    got = batch["stems"][0, 0].numpy()
    candidates = [drums, drums[::-1]]
    ratios = [np.dot(got.ravel(), c.ravel()) / np.dot(c.ravel(), c.ravel()) for c in candidates]
    best = int(np.argmax(np.abs(ratios)))
    assert 0.5 - 1e-4 <= abs(ratios[best]) <= 1.5 + 1e-4
    np.testing.assert_allclose(got, ratios[best] * candidates[best], atol=1e-5)


def test_without_remix_stems_and_mixture_come_from_one_chunk(musdb_shards):
    batch = next(iter(make_loader(musdb_config(musdb_shards, remix=False), "train")))
    key, start = batch["keys"][0].split("@")
    mixture = decode_member(musdb_shards, key, "mixture.flac")[:, int(start) : int(start) + 8000]
    np.testing.assert_array_equal(batch["mixture"][0].numpy(), mixture)


def test_a_crop_reads_only_its_own_bytes(tmp_path, monkeypatch):
    """Cropping 1 s out of a 60 s chunk seeks: far fewer bytes than the member are read from the shard file."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    sf.write(src / "long.wav", 0.1 * rng.standard_normal(16000 * 60), 16000, subtype="PCM_16")
    shard_dataset(src, tmp_path / "out", chunk_seconds=60.0, valid_fraction=0.0, progress=False)
    ref = next(r for r in shards_module.iter_shard(str(tmp_path / "out" / "train-000000.tar")))
    read_bytes = []

    class CountingFile(io.FileIO):
        def read(self, n=-1):
            data = super().read(n)
            read_bytes.append(len(data))
            return data

    monkeypatch.setattr(shards_module, "open", CountingFile, raising=False)  # read_crop's open()
    crop = shards_module.read_crop(ref, "audio", 16000 * 40, 16000)
    assert 0 < sum(read_bytes) < 0.2 * ref.members["audio"][1]
    full, _ = sf.read(src / "long.wav", dtype="float32")
    np.testing.assert_array_equal(crop[0], full[16000 * 40 : 16000 * 41])


def test_loader_refuses_mismatched_shards(speech_shards, musdb_shards):
    with pytest.raises(ConfigError, match="separation needs stem shards"):
        make_loader(musdb_config(speech_shards), "train")
    with pytest.raises(ConfigError, match="not among the shards' stems"):
        make_loader(musdb_config(musdb_shards, sources=["drums", "piano"]), "train")
    with pytest.raises(ValueError, match="split"):
        make_loader(speech_config(speech_shards), "test")


def test_shard_reader_reuses_its_file_and_matches_read_crop(speech_shards, monkeypatch):
    """One open per run of crops from the same shard, the same crops as a fresh read_crop, and a reopen after
    a failed crop."""
    paths = sorted(str(p) for p in Path(speech_shards).glob("train-*.tar"))
    refs = [r for path in paths for r in shards_module.iter_shard(path)]
    opened = []

    class CountingFile(io.FileIO):
        def __init__(self, path, mode="r"):
            opened.append(path)
            super().__init__(path, mode)

    expected = [shards_module.read_crop(ref, "audio", 0, 4000) for ref in refs]
    monkeypatch.setattr(shards_module, "open", CountingFile, raising=False)
    with shards_module.ShardReader() as reader:
        crops = [reader.read_crop(ref, "audio", 0, 4000) for ref in refs]
        assert len(opened) == len(paths)  # refs are grouped by shard: one open per shard
        with pytest.raises(ValueError, match="has no 'vocals' member"):
            reader.read_crop(refs[0], "vocals", 0, 4000)
        broken = shards_module.SampleRef(refs[0].shard, refs[0].key, refs[0].meta, {"audio": (0, 512)})
        with pytest.raises(ValueError, match="cannot decode"):
            reader.read_crop(broken, "audio", 0, 4000)  # the tar header is no audio
        np.testing.assert_array_equal(reader.read_crop(refs[0], "audio", 0, 4000), expected[0])
    for crop, want in zip(crops, expected):
        np.testing.assert_array_equal(crop, want)
