"""Bad shards never crash training by themselves: corrupt members and truncated shards are skipped,
counted and named; too many bad samples stop with a clear error; pickle members and unsafe member
names are never decoded."""

from __future__ import annotations

import io
import json
import logging
import pickle
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from dist_audio.config import DataConfig
from dist_audio.data import CorruptDataError, make_loader
from dist_audio.data.shards import SampleRef, index_shard


def copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shard_names(shards: Path, split: str) -> list[str]:
    return json.loads((shards / "manifest.json").read_text())["splits"][split]["shards"]


def rewrite_shard(path: Path, edit) -> None:
    """Rebuild a tar file with ``edit(list of (name, bytes))`` applied to its members."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    members = edit(members)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def config(shards: Path, **overrides) -> DataConfig:
    return DataConfig(**{"shards": str(shards), "batch_size": 2, "segment_seconds": 0.5, "shuffle_buffer": 4,
                         **overrides})


def test_a_corrupt_member_is_skipped_counted_and_named(speech_shards, tmp_path, caplog):
    shards = copy_shards(speech_shards, tmp_path / "shards")
    victims = [shard_names(shards, split)[0] for split in ("valid", "train")]
    broken = []

    def break_first_flac(members):
        name = next(n for n, _ in members if n.endswith(".flac"))
        broken.append(name[: -len(".flac")])
        return [(n, b"garbage!" + d[8:] if n == name else d) for n, d in members]

    for victim in victims:
        rewrite_shard(shards / victim, break_first_flac)
    clean = list(make_loader(config(speech_shards), "valid"))
    with caplog.at_level(logging.WARNING, logger="dist_audio.data.loader"):
        batches = list(make_loader(config(shards, max_bad_fraction=0.5), "valid"))
        train = list(make_loader(config(shards, max_bad_fraction=0.5), "train"))
    assert len(batches) == len(clean)  # equal batch count: the bad crops become padding rows
    assert sum(b["skipped"].item() for b in batches) >= 1
    assert sum(b["mask"].sum().item() for b in batches) < sum(b["mask"].sum().item() for b in clean)
    # training: the one bad sample's position is filled by another sample, and counted once
    assert len(train) == len(make_loader(config(speech_shards), "train"))
    assert sum(b["skipped"].item() for b in train) == 1
    assert all(not key.startswith(broken[1] + "@") for b in train for key in b["keys"])
    messages = [record.getMessage() for record in caplog.records]
    assert all(any(victim in m for m in messages) for victim in victims)


def test_a_truncated_shard_is_skipped_and_training_goes_on(speech_shards, tmp_path, caplog):
    shards = copy_shards(speech_shards, tmp_path / "shards")
    victim = shard_names(shards, "train")[0]
    data = (shards / victim).read_bytes()
    (shards / victim).write_bytes(data[: len(data) // 3])
    intact = {entry.key for entry in index_shard(str(shards / victim), 4) if isinstance(entry, SampleRef)}
    lost = set(sample_keys(speech_shards / victim)) - intact
    assert intact and lost
    cfg = config(shards, max_bad_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="dist_audio.data.loader"):
        batches = list(make_loader(cfg, "train"))
    assert len(batches) == len(make_loader(config(speech_shards), "train")) == 22 // 2  # the epoch keeps its length
    assert sum(b["skipped"].item() for b in batches) == len(lost)  # each lost position counted once
    assert not {key.split("@")[0] for b in batches for key in b["keys"]} & lost  # nothing from the cut part
    assert any(victim in record.getMessage() for record in caplog.records)
    # a lost position takes the next usable sample under one rule, so two workers give the same batches
    with_workers = list(make_loader(config(shards, max_bad_fraction=1.0, num_workers=2), "train"))
    assert [b["keys"] for b in with_workers] == [b["keys"] for b in batches]
    assert all(torch.equal(a["y"], b["y"]) and a["skipped"] == b["skipped"] for a, b in zip(with_workers, batches))


def sample_keys(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return [m.name[: -len(".json")] for m in tar if m.name.endswith(".json")]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_too_many_bad_samples_stop_with_a_clear_error(speech_shards, tmp_path, num_workers):
    shards = copy_shards(speech_shards, tmp_path / "shards")
    victims = shard_names(shards, "train")[:3]
    for victim in victims:
        (shards / victim).write_bytes(b"\0" * 100)
    cfg = config(shards, max_bad_fraction=0.05, bad_window=20, num_workers=num_workers)
    with pytest.raises(CorruptDataError, match=r"exceed data\.max_bad_fraction=0\.05") as info:
        list(make_loader(cfg, "train"))
    assert any(victim in str(info.value) for victim in victims)


def test_pickle_members_are_never_decoded(speech_shards, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    shards = copy_shards(speech_shards, tmp_path / "shards")
    evil = pickle.dumps(Payload())
    for name in shard_names(shards, "valid"):
        rewrite_shard(shards / name, lambda members: [
            item for n, d in members for item in ([(n, d)] + ([(n[: -len("json")] + "pyd", evil)]
                                                             if n.endswith(".json") else []))])
    batches = list(make_loader(config(shards), "valid"))
    assert not marker.exists()
    assert sum(b["skipped"].item() for b in batches) == 0  # other members are ignored, not fatal
    assert sum(b["mask"].sum().item() for b in batches) == sum(
        b["mask"].sum().item() for b in make_loader(config(speech_shards), "valid"))


def test_unsafe_member_names_are_refused(speech_shards, tmp_path, caplog):
    shards = copy_shards(speech_shards, tmp_path / "shards")
    victim = shard_names(shards, "valid")[0]

    def escape(members):
        first = members[0][0].split(".")[0]
        return [(f"../{n}" if n.startswith(first) and n.endswith(".flac") else n, d) for n, d in members] + [
            ("/etc/x.json", b"{}")]

    rewrite_shard(shards / victim, escape)
    with caplog.at_level(logging.WARNING, logger="dist_audio.data.loader"):
        batches = list(make_loader(config(shards, max_bad_fraction=1.0), "valid"))
    assert sum(b["skipped"].item() for b in batches) >= 2
    assert all(".." not in key for b in batches for key in b["keys"])
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "refused member name '../" in messages and "'/etc/x.json'" in messages
    assert all(torch.isfinite(b["y"].float()).all() for b in batches)
