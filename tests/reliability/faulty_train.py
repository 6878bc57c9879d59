"""``launch/train.py`` with deterministic fault injection and a per-step loss record, for the
reliability tests and ``bench/soak.py``. Use it exactly like ``launch/train.py`` (also under
``accelerate launch``); two environment variables switch the extras on:

``DIST_AUDIO_FAULT=<where>:<step>[@<rank>]`` SIGKILLs the process of rank ``<rank>`` (default 0):

- ``after_step:N``     right after optimizer step N was applied, before it is logged or checkpointed;
- ``in_save:N``        half-way through writing checkpoint N: model and optimizer are in ``.tmp-step-N/``,
                       the trainer state is not;
- ``before_rename:N``  checkpoint N fully written into ``.tmp-step-N/`` except ``trainer_state.json``,
                       not yet renamed;
- ``in_prune:N``       checkpoint N is complete and an older one is half-deleted by ``keep_last``.

``DIST_AUDIO_STEP_LOG=<file>`` makes rank 0 append one JSON line per optimizer step:
``{"step", "loss", "applied", "pid"}`` (flushed at once, so a SIGKILL loses nothing already written), and
every rank append ``{"rank", "exit"}`` to ``<file>.exits`` when ``launch/train.py``'s ``main`` returns
(the launcher may still kill a rank that is slower to exit than another, which hides its own status).

Nothing here is imported by dist_audio itself: production code carries no test hooks.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from dist_audio.train import checkpoint  # noqa: E402
from dist_audio.train import trainer as trainer_lib  # noqa: E402
from dist_audio.train.portable_state import StateHolder  # noqa: E402
from launch import train  # noqa: E402


def parse_fault(spec: str) -> tuple[str, int, int]:
    """``"in_save:6@1"`` -> ``("in_save", 6, 1)``."""
    where, _, rest = spec.partition(":")
    step, _, rank = rest.partition("@")
    return where, int(step), int(rank or 0)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(fault: str | None, step_log: str | Path | None, setattr=setattr) -> None:
    """Patch the trainer and checkpoint functions to die at ``fault`` and record every step (in-process
    tests pass ``monkeypatch.setattr`` so that the patches are undone after the test)."""
    rank = int(os.environ.get("RANK", "0"))
    where, fault_step, fault_rank = parse_fault(fault) if fault else ("", -1, -1)
    armed = rank == fault_rank

    train_step = trainer_lib.Trainer.train_step

    def recorded_train_step(self, loaded):
        result = train_step(self, loaded)
        step = self.state.step + 1
        if step_log and rank == 0:
            with open(step_log, "a") as record:
                record.write(json.dumps({"step": step, "loss": result.loss, "applied": result.applied,
                                         "pid": os.getpid()}) + "\n")
        if armed and where == "after_step" and step == fault_step:
            die()
        return result

    setattr(trainer_lib.Trainer, "train_step", recorded_train_step)

    save_state = StateHolder.save

    def save_state_then_die(holder, directory):
        save_state(holder, directory)
        if armed and where == "in_save" and Path(directory).parent.name == f".tmp-step-{fault_step}":
            die()

    setattr(StateHolder, "save", save_state_then_die)

    save_config = checkpoint.save_config

    def save_config_then_die(cfg, path):
        save_config(cfg, path)
        if armed and where == "before_rename" and Path(path).parent.name == f".tmp-step-{fault_step}":
            die()

    setattr(checkpoint, "save_config", save_config_then_die)

    remove = checkpoint._remove

    def remove_half_then_die(old):
        if armed and where == "in_prune" and (old.parent / f"step-{fault_step}" / checkpoint.STATE_FILE).is_file():
            (old / checkpoint.STATE_FILE).unlink()
            die()
        remove(old)

    setattr(checkpoint, "_remove", remove_half_then_die)


def record_exit(step_log: str | None, code: int) -> None:
    if step_log:
        with open(f"{step_log}.exits", "a") as record:
            record.write(json.dumps({"rank": int(os.environ.get("RANK", "0")), "exit": code}) + "\n")


if __name__ == "__main__":
    install(os.environ.get("DIST_AUDIO_FAULT"), os.environ.get("DIST_AUDIO_STEP_LOG"))
    code = train.main(sys.argv[1:])
    record_exit(os.environ.get("DIST_AUDIO_STEP_LOG"), code)
    train.exit_process(code)
