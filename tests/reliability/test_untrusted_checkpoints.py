"""A checkpoint or export carrying a malicious pickle is refused by ``dist_audio.inference.load_model`` and
by ``--resume auto``, and the payload never runs: everything is read with ``torch.load(weights_only=True)``
or safetensors. (DeepSpeed ZeRO and FSDP2 checkpoints are read by those libraries' own loaders, which
unpickle: see docs/reliability.md.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from dist_audio.inference import load_model
from dist_audio.train.checkpoint import latest_checkpoint
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


def poisoned_copy(run_dir: Path, tmp_path: Path, member: str) -> tuple[Path, Path]:
    """A copy of the run whose checkpoint file ``member`` is replaced by a pickle that creates a file."""
    copy = Path(shutil.copytree(run_dir, tmp_path / "poisoned"))
    marker = tmp_path / "payload-ran"
    torch.save({"state": Payload(marker)}, latest_checkpoint(copy) / member)
    return copy, marker


def test_load_model_refuses_a_pickled_payload(trained, tmp_path):
    run_dir, _ = trained
    poisoned, marker = poisoned_copy(run_dir, tmp_path, "ema/rank0.pt")
    for target in (poisoned, latest_checkpoint(poisoned)):  # a run directory and a checkpoint directory
        with pytest.raises(Exception, match=r"[Ww]eights only load failed"):
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


@pytest.mark.parametrize("member", ["optimizer.bin", "rng/rank0.pt", "ema/rank0.pt"])
def test_resume_refuses_a_pickled_payload(trained, tmp_path, member, capsys):
    run_dir, args = trained
    poisoned, marker = poisoned_copy(run_dir, tmp_path, member)
    resume = [*args, "--set", f"train.runs_dir={poisoned.parent}", "--set", f"train.name={poisoned.name}",
              "--set", "train.max_steps=3", "--resume", "auto"]
    assert launch_train.main(resume) == 1
    failure = [line for line in capsys.readouterr().err.splitlines() if line.startswith("training failed:")]
    assert len(failure) == 1 and "refused to load" in failure[0] and "step-2" in failure[0], failure
    assert not marker.exists()


def test_accelerates_own_rng_pickle_is_never_unpickled(trained, tmp_path):
    """Accelerate also writes ``random_states_0.pkl`` and reads it with weights_only=True, skipping it when
    that fails; the trainer's own ``rng/rank<r>.pt`` restores the random state either way."""
    run_dir, args = trained
    poisoned, marker = poisoned_copy(run_dir, tmp_path, "random_states_0.pkl")
    resume = [*args, "--set", f"train.runs_dir={poisoned.parent}", "--set", f"train.name={poisoned.name}",
              "--set", "train.max_steps=3", "--resume", "auto"]
    assert launch_train.main(resume) == 0
    assert not marker.exists() and latest_checkpoint(poisoned).name == "step-3"
