"""A checkpoint or export carrying a malicious pickle is refused by ``dist_audio.inference.load_model`` and
by ``--resume auto``, and the payload never runs: everything is read with ``torch.load(weights_only=True)``,
DCP metadata with an unpickler that knows only DCP's classes, exports with safetensors.

A file replaced after the checkpoint was written no longer matches the SHA-256 in ``trainer_state.json``,
so ``--resume auto`` skips the checkpoint without opening it; the tests below also forge that record (as
someone who controls the files can) to reach the loaders' own refusal."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from dist_audio.inference import load_model
from dist_audio.train.checkpoint import FILES_KEY, STATE_FILE, latest_checkpoint
from launch import train as launch_train


class Payload:
    """Unpickling this creates a file: proof that the pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, speech_shards):
    """A finished 2-step run with an EMA (so ``ema/rank0.pt`` exists); tests work on copies of it."""
    root = tmp_path_factory.mktemp("trained")
    args = ["--config", str(Path(__file__).parents[2] / "configs/sashimi/debug.yaml")]
    for item in [f"data.shards={speech_shards}", f"train.runs_dir={root}", "train.name=good", "train.max_steps=2",
                 "data.batch_size=2", "train.val_batches=1", "log.audio_seconds=0.01", "optim.ema_decay=0.9"]:
        args += ["--set", item]
    assert launch_train.main(args) == 0
    return root / "good", args


def poisoned_copy(run_dir: Path, tmp_path: Path, member: str, *, forge_record: bool = True) -> tuple[Path, Path]:
    """A copy of the run whose checkpoint file ``member`` is replaced by a pickle that creates a file;
    ``forge_record``: its size and hash in ``trainer_state.json`` are updated to match."""
    copy = Path(shutil.copytree(run_dir, tmp_path / "poisoned"))
    marker = tmp_path / "payload-ran"
    checkpoint = latest_checkpoint(copy)
    (checkpoint / member).write_bytes(pickle.dumps({"state": Payload(marker)}))
    if forge_record:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        state[FILES_KEY].pop(member, None)  # an unrecorded file is not checked
        (checkpoint / STATE_FILE).write_text(json.dumps(state))
    return copy, marker


def test_load_model_refuses_a_pickled_payload(trained, tmp_path):
    run_dir, _ = trained
    poisoned, marker = poisoned_copy(run_dir, tmp_path, "state/.metadata")
    for target in (poisoned, latest_checkpoint(poisoned)):  # a run directory and a checkpoint directory
        with pytest.raises(Exception, match=r"checkpoint metadata refers to"):
            load_model(target)
    assert not marker.exists()


def test_an_export_is_safetensors_only(trained, tmp_path):
    """An export with pickle bytes where the safetensors should be is refused, not unpickled."""
    run_dir, _ = trained
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(latest_checkpoint(run_dir) / "config.yaml", export / "config.yaml")
    marker = tmp_path / "payload-ran"
    torch.save(Payload(marker), export / "model.safetensors")
    with pytest.raises(Exception, match=r"(?i)header|safetensor|deserializ"):
        load_model(export)
    assert not marker.exists() and yaml.safe_load((export / "config.yaml").read_text())["model"]["name"] == "sashimi"


def test_resume_skips_a_replaced_file_without_opening_it(trained, tmp_path, caplog):
    run_dir, args = trained
    poisoned, marker = poisoned_copy(run_dir, tmp_path, "rng/rank0.pt", forge_record=False)
    resume = [*args, "--set", f"train.runs_dir={poisoned.parent}", "--set", f"train.name={poisoned.name}",
              "--set", "train.max_steps=3", "--resume", "auto"]
    assert launch_train.main(resume) == 0  # no earlier checkpoint: a fresh start, step-2 rewritten
    assert "skipping checkpoint" in caplog.text and "rng/rank0.pt has" in caplog.text
    assert not marker.exists()


@pytest.mark.parametrize("member", ["rng/rank0.pt", "state/.metadata"])
def test_resume_refuses_a_pickled_payload(trained, tmp_path, member, capsys):
    run_dir, args = trained
    poisoned, marker = poisoned_copy(run_dir, tmp_path, member)
    resume = [*args, "--set", f"train.runs_dir={poisoned.parent}", "--set", f"train.name={poisoned.name}",
              "--set", "train.max_steps=3", "--resume", "auto"]
    assert launch_train.main(resume) == 1
    failure = [line for line in capsys.readouterr().err.splitlines() if line.startswith("training failed:")]
    assert len(failure) == 1 and "refused to load" in failure[0] and "step-2" in failure[0], failure
    assert not marker.exists()


def test_a_stray_pickle_in_a_checkpoint_is_never_unpickled(trained, tmp_path):
    """A pickle planted beside the checkpoint's own files (Accelerate's ``random_states_0.pkl`` of older
    layouts) is not part of the checkpoint and is never read."""
    run_dir, args = trained
    poisoned, marker = poisoned_copy(run_dir, tmp_path, "random_states_0.pkl")
    resume = [*args, "--set", f"train.runs_dir={poisoned.parent}", "--set", f"train.name={poisoned.name}",
              "--set", "train.max_steps=3", "--resume", "auto"]
    assert launch_train.main(resume) == 0
    assert not marker.exists() and latest_checkpoint(poisoned).name == "step-3"
