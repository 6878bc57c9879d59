"""dist_audio.data.make_loader: batch contract, exact-once validation across ranks and workers, one global
training order whatever the world size and worker count, equal batch counts, exact resume at any global
batch, crop by seek, remix."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

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


def global_steps(cfg: DataConfig, world_size: int, **kwargs) -> list[dict[str, torch.Tensor]]:
    """Step j → {key: that example's tensor} over all ranks' micro-batches of the step (checking that each rank
    yields whole steps of equal length)."""
    loaders = [make_loader(cfg, "train", rank=r, world_size=world_size, **kwargs) for r in range(world_size)]
    per_rank = [list(loader) for loader in loaders]
    steps = loaders[0].steps
    assert [len(b) for b in per_rank] == [len(loader) for loader in loaders] == [len(per_rank[0])] * world_size
    assert [loader.steps for loader in loaders] == [steps] * world_size and len(per_rank[0]) % max(steps, 1) == 0
    micro = len(per_rank[0]) // steps if steps else 0
    name = "y" if cfg.task == "autoregressive" else "stems"
    result = []
    for step in range(steps):
        examples = {}
        for batches in per_rank:
            for batch in batches[step * micro : (step + 1) * micro]:
                assert len(batch["keys"]) == cfg.batch_size and "mask" not in batch
                examples.update(zip(batch["keys"], batch[name]))
        result.append(examples)
    return result


def same_steps(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_a_global_step_does_not_depend_on_world_size_or_workers(speech_shards):
    """Step k holds the same examples (keys, crop offsets, tokens) for 1, 2 or 3 ranks and 0, 1 or 2 workers."""
    cfg = speech_config(speech_shards, batch_size=1)
    reference = global_steps(cfg, 1, seed=5, epoch=1, global_batch=6)
    assert len(reference) == 22 // 6 and all(len(step) == 6 for step in reference)
    for world_size in (1, 2, 3):
        for num_workers in (0, 1, 2):
            steps = global_steps(speech_config(speech_shards, batch_size=1, num_workers=num_workers), world_size,
                                 seed=5, epoch=1, global_batch=6)
            assert same_steps(steps, reference), (world_size, num_workers)
    # the micro-batch size does not matter either: 2 ranks × 3 micro-batches of 1 = 2 ranks × 1 of 3
    assert same_steps(global_steps(speech_config(speech_shards, batch_size=3), 2, seed=5, epoch=1), reference)


def test_remixed_steps_do_not_depend_on_world_size_or_workers(musdb_shards):
    cfg = musdb_config(musdb_shards, batch_size=2)
    reference = global_steps(cfg, 1, global_batch=4)
    assert len(reference) == 16 // 4
    assert same_steps(global_steps(musdb_config(musdb_shards, batch_size=1, num_workers=2), 2, global_batch=4),
                      reference)


def test_an_epoch_reads_every_sample_once_in_an_order_new_each_epoch(speech_shards, musdb_shards):
    chunks = all_chunks(speech_shards, "train")
    cfg = speech_config(speech_shards, batch_size=2)
    keys = [k for step in global_steps(cfg, 1) for k in step]
    samples = [k.split("@")[0] for k in keys]
    assert len(samples) == len(set(samples)) == len(chunks) // 2 * 2  # whole global batches of 2: 22 of 22
    assert set(samples) <= set(chunks)
    assert all(0 <= int(k.split("@")[1]) <= chunks[s]["frames"] - 8000 for k, s in zip(keys, samples))
    again = [k for step in global_steps(cfg, 1) for k in step]
    assert again == keys  # deterministic
    other_epoch = [k for step in global_steps(cfg, 1, epoch=1) for k in step]
    other_seed = [k for step in global_steps(cfg, 1, seed=1) for k in step]
    assert other_epoch != keys and other_seed != keys
    assert sorted(k.split("@")[0] for k in other_epoch) == sorted(samples)
    # remix: each stem's own order also visits every chunk once
    remixed = [k for step in global_steps(musdb_config(musdb_shards), 1) for k in step]
    for stem in range(4):
        stem_samples = [k.split("+")[stem].split("@")[0] for k in remixed]
        assert len(stem_samples) == len(set(stem_samples)) == 16


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resuming_at_start_sample_continues_exactly_even_with_another_global_batch(speech_shards, num_workers):
    cfg = speech_config(speech_shards, batch_size=2, num_workers=num_workers)
    full = global_steps(cfg, 2, seed=3, epoch=2, global_batch=4)  # 5 steps of 4 from 22 samples
    positions = [example for step in full for example in step.items()]
    assert len(full) == 5
    resumed = global_steps(cfg, 2, seed=3, epoch=2, global_batch=4, start_sample=2 * 4)
    assert same_steps(resumed, full[2:])
    # after 2 steps of 4, continue with global batches of 6 on 3 ranks: positions 8..13 and 14..19
    regrouped = global_steps(speech_config(speech_shards, batch_size=2, num_workers=num_workers), 3, seed=3,
                             epoch=2, global_batch=6, start_sample=8)
    assert len(regrouped) == 2
    expected = [dict(positions[8:14]), dict(positions[14:20])]
    assert same_steps(regrouped, expected)


def test_global_batch_must_split_into_whole_micro_batches(speech_shards):
    cfg = speech_config(speech_shards, batch_size=2)
    loader = make_loader(cfg, "train", rank=0, world_size=2, global_batch=8)
    assert (len(loader), loader.steps) == (2 * (22 // 8), 22 // 8)  # 2 micro-batches of 2 per rank and step
    for world_size, global_batch in ((2, 6), (3, 8), (1, 3)):
        with pytest.raises(ConfigError, match=r"data\.batch_size"):
            make_loader(cfg, "train", world_size=world_size, global_batch=global_batch)
    with pytest.raises(ConfigError, match=r"data\.batch_size.*more than the 22 training samples"):
        make_loader(cfg, "train", world_size=2, global_batch=24)
    assert len(make_loader(cfg, "train", start_sample=21)) == 0  # less than a global batch left in the epoch
    with pytest.raises(ValueError, match="validation always starts"):
        make_loader(cfg, "valid", start_sample=2)


def test_remixed_mixture_is_the_sum_of_stems_from_different_chunks(musdb_shards):
    cfg = musdb_config(musdb_shards, batch_size=4, remix_gain=[0.5, 1.5])
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


def test_a_crop_reads_only_its_own_bytes(long_chunk_shards, monkeypatch):
    """Cropping 1 s out of a 60 s chunk seeks: far fewer bytes than the member are read from the shard file."""
    wav, shards = long_chunk_shards
    ref = next(r for r in shards_module.iter_shard(str(shards / "train-000000.tar")))
    read_bytes = []

    class CountingFile(io.FileIO):
        def read(self, n=-1):
            data = super().read(n)
            read_bytes.append(len(data))
            return data

    monkeypatch.setattr(shards_module, "open", CountingFile, raising=False)  # read_crop's open()
    crop = shards_module.read_crop(ref, "audio", 16000 * 40, 16000)
    assert 0 < sum(read_bytes) < 0.2 * ref.members["audio"][1]
    full, _ = sf.read(wav, dtype="float32")
    np.testing.assert_array_equal(crop[0], full[16000 * 40 : 16000 * 41])


def test_loader_refuses_mismatched_shards(speech_shards, musdb_shards):
    with pytest.raises(ConfigError, match="separation needs stem shards"):
        make_loader(musdb_config(speech_shards), "train")
    with pytest.raises(ConfigError, match="not among the shards' stems"):
        make_loader(musdb_config(musdb_shards, sources=["drums", "piano"]), "train")
    with pytest.raises(ValueError, match="split"):
        make_loader(speech_config(speech_shards), "test")


def test_shard_reader_reuses_its_files_and_matches_read_crop(speech_shards, monkeypatch):
    """One open per shard while crops move between a few shards, the same crops as a fresh read_crop, and a
    reopen after a failed crop."""
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
        interleaved = [reader.read_crop(ref, "audio", 0, 4000) for ref in refs[::3] + refs[1::3] + refs[2::3]]
        assert len(opened) == len(paths)  # the shards stay open: one open per shard
        with pytest.raises(ValueError, match="has no 'vocals' member"):
            reader.read_crop(refs[0], "vocals", 0, 4000)
        broken = shards_module.SampleRef(refs[0].shard, refs[0].key, refs[0].meta, {"audio": (0, 512)})
        with pytest.raises(ValueError, match="cannot decode"):
            reader.read_crop(broken, "audio", 0, 4000)  # the tar header is no audio
        np.testing.assert_array_equal(reader.read_crop(refs[0], "audio", 0, 4000), expected[0])
        assert len(opened) == len(paths) + 1
    for crop, want in zip(crops + interleaved, expected + expected[::3] + expected[1::3] + expected[2::3]):
        np.testing.assert_array_equal(crop, want)
    pcm = shards_module.read_crop(refs[0], "audio", 100, 4000, dtype="int16")  # the samples as stored
    assert pcm.dtype == np.int16 and np.array_equal(pcm / 32768, shards_module.read_crop(refs[0], "audio", 100, 4000))


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_tar_index_finds_what_tarfile_finds(tmp_path, tar_format):
    """Shards are indexed from their headers without tarfile; the members agree with tarfile's for every header
    format (ustar prefixes, GNU long names, pax records), and a damaged header is an unreadable shard."""
    names = ["a.json", "p" * 90 + "/" + "q" * 90 + ".flac", "short"]
    if tar_format != tarfile.USTAR_FORMAT:
        names += ["dir/" + "x" * 120 + ".wav", "ünï.json"]
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w", format=tar_format) as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 100 * i + 1
            tar.addfile(info, io.BytesIO(b"z" * info.size))
        link = tarfile.TarInfo("link.json")
        link.type, link.linkname = tarfile.SYMTYPE, "a.json"
        tar.addfile(link)
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size, m.isreg()) for m in tar]
    with open(path, "rb") as f:
        assert [tuple(m) for m in shards_module._tar_members(f, path.stat().st_size)] == expected
    data = bytearray(path.read_bytes())
    data[expected[1][1] - 512 + 10] ^= 0xFF  # a name byte of the second header: its checksum no longer matches
    path.write_bytes(bytes(data))
    entries = shards_module.index_shard(str(path), 5)
    assert len(entries) == 5
    assert all(isinstance(e, shards_module.BadSample) and "bad tar header checksum at byte" in e.reason
               for e in entries)
