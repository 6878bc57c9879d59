"""Bad and hostile shards in a whole training run (``launch/train.py``): corrupt data is skipped, counted
in TensorBoard's ``data/skipped_samples`` and named; too much of it stops the run with exit 1; pickle
members are never unpickled and escaping member names are refused.

The loader-level behaviour is tested in ``tests/data/test_corrupt_shards.py``; here it goes through the
trainer and the command line.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_audio.config import load_config
from dist_audio.data import make_loader
from launch import train as launch_train

STEPS = 11  # one epoch of the 22 training samples in batches of 2: every damaged sample is met


def rewrite_shard(path: Path, edit) -> None:
    """Rebuild a tar file with ``edit(list of (name, bytes))`` applied to its members."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(path, "w") as tar:
        for name, data in edit(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def train_shards(shards: Path) -> list[Path]:
    return [shards / name for name in json.loads((shards / "manifest.json").read_text())["splits"]["train"]["shards"]]


def skipped_in_tensorboard(run_dir: Path) -> list[float]:
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return [event.value for event in events.Scalars("data/skipped_samples")]


@pytest.fixture
def damaged_shards(speech_shards, tmp_path) -> tuple[Path, list[str]]:
    """Speech shards with the first train shard cut to a third and a garbage FLAC member in the second."""
    shards = Path(shutil.copytree(speech_shards, tmp_path / "damaged"))
    first, second = train_shards(shards)[:2]
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 3])

    def break_first_flac(members):
        victim = next(n for n, _ in members if n.endswith(".flac"))
        return [(n, b"garbage!" * 8 + d[64:] if n == victim else d) for n, d in members]

    rewrite_shard(second, break_first_flac)
    return shards, [first.name, second.name]


def test_corrupt_shards_are_skipped_counted_and_training_goes_on(make_run, damaged_shards, caplog):
    shards, victims = damaged_shards
    run = make_run("corrupt", f"train.max_steps={STEPS}", "train.checkpoint_every=100",
                   "data.max_bad_fraction=0.5", "data.bad_window=50", shards=shards)
    assert launch_train.main(run.args()) == 0
    # the count the trainer logged is the count of the samples the loader skipped in those batches
    cfg = load_config(run.config, run.overrides)
    expected = sum(int(batch["skipped"]) for _, batch in zip(range(STEPS), make_loader(cfg.data, "train")))
    logged = skipped_in_tensorboard(run.run_dir)
    assert expected > 0 and logged[-1] == expected and logged == sorted(logged)  # a running total
    assert json.loads((run.run_dir / "checkpoints" / f"step-{STEPS}" / "trainer_state.json").read_text()
                      )["skipped_samples"] == expected
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert all(any(victim in w for w in warnings) for victim in victims), warnings  # each shard named


def test_too_much_corrupt_data_stops_the_run_naming_the_shards(make_run, damaged_shards, capsys):
    shards, _ = damaged_shards
    for shard in train_shards(shards)[2:]:
        shard.write_bytes(b"\0" * 100)  # now no train shard is readable in full
    run = make_run("too-corrupt", "train.max_steps=50", "data.max_bad_fraction=0.05", "data.bad_window=20",
                   shards=shards)
    assert launch_train.main(run.args()) == 1
    failure = [line for line in capsys.readouterr().err.splitlines() if line.startswith("training failed:")]
    assert len(failure) == 1 and "max_bad_fraction=0.05" in failure[0]
    assert any(name.name in failure[0] for name in train_shards(shards)), failure[0]
    assert not (run.run_dir / "checkpoints" / "step-50").exists()


class Payload:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_hostile_members_are_never_unpickled_or_followed(make_run, speech_shards, tmp_path, caplog):
    marker = tmp_path / "pickle-was-loaded"
    shards = Path(shutil.copytree(speech_shards, tmp_path / "hostile"))
    evil = pickle.dumps(Payload(marker))

    def add_hostile_members(members):
        json_name = next(n for n, _ in members if n.endswith(".json"))
        flac = next(d for n, d in members if n.endswith(".flac"))
        escaping = [("../evil.json", next(d for n, d in members if n == json_name)), ("../evil.flac", flac),
                    (str(tmp_path / "absolute.json"), b'{"frames": 100}'), (str(tmp_path / "absolute.flac"), flac)]
        # a .pyd (WebDataset's pickle extension) and a .pickle inside every sample, after its JSON
        with_pickles = [item for n, d in members for item in [(n, d)] + (
            [(n[: -len("json")] + "pyd", evil), (n[: -len("json")] + "pickle", evil)] if n.endswith(".json") else [])]
        # the escaping samples take the place of the shard's last two, so the loader's epoch order meets them
        replaced = [n.split(".")[0] for n, _ in members if n.endswith(".json")][-2:]
        return [(n, d) for n, d in with_pickles if n.split(".")[0] not in replaced] + escaping

    for shard in train_shards(shards):
        rewrite_shard(shard, add_hostile_members)
    run = make_run("hostile", "train.max_steps=4", "data.max_bad_fraction=0.5", "data.bad_window=50",
                   shards=shards)
    assert launch_train.main(run.args()) == 0
    assert not marker.exists()
    assert not (tmp_path / "absolute.json").exists() and not (tmp_path / "evil.flac").exists()
    assert not list(shards.parent.glob("evil.*")) and not list(Path.cwd().glob("evil.*"))
    assert skipped_in_tensorboard(run.run_dir)[-1] > 0  # the escaping samples were refused, and counted
    assert "refused member name '../evil.json'" in caplog.text
