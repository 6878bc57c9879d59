"""The training loop on the real debug models, single process on CPU: resume, faults, auto_fit, logs."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_audio.train import trainer as trainer_lib
from dist_audio.train.checkpoint import complete_checkpoints, latest_checkpoint
from dist_audio.train.trainer import Trainer, TrainingError, make_accelerator, prepare_run_dir, run_test_mode
from launch import train as launch_train

SCALAR_TAGS = ["train/loss", "val/loss", "opt/lr", "opt/grad_norm", "perf/samples_per_s",
               "perf/audio_seconds_per_s", "perf/step_time_s", "perf/data_time_frac", "mem/peak_gib",
               "data/skipped_samples", "train/skipped_steps", "mem/oom_retries"]


def cli_args(path, overrides, *extra):
    return ["--config", str(path), *[arg for item in overrides for arg in ("--set", item)], *extra]


def start(cfg, *, resume=False, overwrite=True):
    accelerator = make_accelerator(cfg)
    prepare_run_dir(accelerator, cfg.run_dir, overwrite=overwrite)
    return Trainer(cfg, accelerator, resume=resume)


def wrap_loss(monkeypatch, before=None, after=None):
    """Objectives built by the trainer call ``before(batch, call)`` ahead of each loss and return
    ``after(loss, call)`` instead of the loss; ``call`` counts loss calls (micro-batches) from 1."""
    build = trainer_lib.build_objective

    def build_with_hook(model_cfg, data_cfg):
        objective = build(model_cfg, data_cfg)
        loss_fn = objective.loss
        calls = {"n": 0}

        def hooked(model, batch):
            calls["n"] += 1
            if before is not None:
                before(batch, calls["n"])
            loss, metrics = loss_fn(model, batch)
            return (loss if after is None else after(loss, calls["n"])), metrics

        objective.loss = hooked
        return objective

    monkeypatch.setattr(trainer_lib, "build_objective", build_with_hook)


def read_events(run_dir):
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "audio": 0, "images": 0})
    events.Reload()
    return events


@pytest.mark.parametrize("model", ["sashimi", "tfswa"])
def test_test_mode_writes_every_tag(make_cfg, model):
    path, overrides, cfg = make_cfg(model)
    assert launch_train.main(cli_args(path, overrides, "--test-mode")) == 0
    run_dir = cfg.run_dir.with_name(cfg.train.name + "-test-mode")
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-2", "step-4"]
    tags = read_events(run_dir).Tags()
    expected = SCALAR_TAGS + (["train/bits_per_sample"] if model == "sashimi" else
                              [f"val/sdr/{stem}" for stem in cfg.model.sources] + ["val/sdr/avg"])
    assert not set(expected) - set(tags["scalars"])
    channels = 1 if model == "sashimi" else cfg.model.channels
    assert tags["audio"] and all(any(t.endswith(f"/ch{c}") for t in tags["audio"]) for c in range(channels))
    assert any(t.startswith("spectrogram/") for t in tags["images"])
    assert "_hparams_/experiment" in read_events(run_dir).PluginTagToContent("hparams")


def test_resume_equals_uninterrupted(make_cfg):
    settings = ["train.max_steps=6", "train.checkpoint_every=3", "optim.warmup_steps=2", "optim.ema_decay=0.9"]
    _, _, cfg = make_cfg("tfswa", *settings, "train.name=whole")
    uninterrupted = start(cfg)
    whole = uninterrupted.train().losses
    _, _, cfg = make_cfg("tfswa", *settings, "train.name=split")
    first = start(cfg).train(until_step=4)  # ends with a checkpoint at step 4 ...
    root = cfg.run_dir / "checkpoints"
    (root / "step-4").rename(root / ".tmp-step-4")  # ... which a kill left half-written
    resumed = start(cfg, resume=True, overwrite=False)
    assert resumed.state.step == 3
    second = resumed.train().losses
    assert first.losses == {step: whole[step] for step in (1, 2, 3, 4)}
    assert second == {step: whole[step] for step in (4, 5, 6)}
    assert not list(root.glob(".tmp-*"))
    for name, average in uninterrupted.ema.shadow.items():
        assert torch.equal(resumed.ema.shadow[name], average), name


def test_keep_last_and_partial_checkpoints_never_chosen(make_cfg):
    _, _, cfg = make_cfg("sashimi", "train.max_steps=4", "train.checkpoint_every=1", "train.keep_last=2")
    start(cfg).train()
    assert [p.name for p in complete_checkpoints(cfg.run_dir)] == ["step-3", "step-4"]
    # a half-written newer checkpoint: a leftover temporary dir and a step dir without trainer_state.json
    root = cfg.run_dir / "checkpoints"
    (root / ".tmp-step-9").mkdir()
    (root / "step-8").mkdir()
    (root / "step-8" / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(cfg.run_dir).name == "step-4"
    assert start(cfg, resume=True, overwrite=False).state.step == 4


def test_auto_fit_halves_micro_batch_with_same_losses(make_cfg, monkeypatch):
    # the same samples either way: the loader's global order does not depend on the batch size (two steps:
    # both runs are still in their first epoch, whose ends differ, 5 × 4 and 2 × 8 of the 22 samples)
    _, _, reference_cfg = make_cfg("sashimi", "train.max_steps=2", "data.batch_size=4", "train.grad_accum=2",
                                   "train.name=ref")
    reference = start(reference_cfg).train().losses

    seen_sizes = []

    def fail_above_four(batch, _):
        seen_sizes.append(len(batch["keys"]))
        if len(batch["keys"]) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB (injected)")

    wrap_loss(monkeypatch, before=fail_above_four)
    _, _, cfg = make_cfg("sashimi", "train.max_steps=2", "data.batch_size=8", "train.auto_fit=true",
                         "train.name=fit")
    trainer = start(cfg)
    losses = trainer.train().losses
    assert seen_sizes[:3] == [8, 4, 4]
    assert (trainer.auto_fit.splits, trainer.auto_fit.retries) == (2, 1)
    assert losses.keys() == reference.keys()
    for step, loss in reference.items():
        assert math.isclose(losses[step], loss, rel_tol=1e-6), (step, losses[step], loss)
    assert read_events(cfg.run_dir).Scalars("mem/oom_retries")[-1].value == 1


def test_auto_fit_gives_up_at_micro_batch_one(make_cfg, monkeypatch):
    def always_oom(batch, _):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    wrap_loss(monkeypatch, before=always_oom)
    _, _, cfg = make_cfg("sashimi", "train.max_steps=2", "train.auto_fit=true")
    with pytest.raises(RuntimeError, match="micro-batch 1"):
        start(cfg).train()


def test_non_finite_steps_are_skipped_then_stop_the_run(make_cfg, monkeypatch):
    poisoned = {2}
    wrap_loss(monkeypatch, after=lambda loss, call: loss * math.nan if call in poisoned else loss)
    _, _, cfg = make_cfg("sashimi", "train.max_steps=3", "train.max_nonfinite_steps=2", "train.name=one")
    trainer = start(cfg)
    result = trainer.train()
    assert math.isnan(result.losses[2]) and all(math.isfinite(result.losses[s]) for s in (1, 3))
    assert trainer.state.skipped_steps == 1
    assert read_events(cfg.run_dir).Scalars("train/skipped_steps")[-1].value == 1

    poisoned.clear()
    poisoned.update({3, 4})
    _, _, cfg = make_cfg("sashimi", "train.max_steps=6", "train.checkpoint_every=1",
                         "train.max_nonfinite_steps=2", "train.name=two")
    with pytest.raises(TrainingError) as failure:
        start(cfg).train()
    message = str(failure.value)
    assert "stopped at step 4" in message and "step-3" in message and "keys" in message


def test_sigterm_finishes_step_checkpoints_and_says_how_to_resume(make_cfg, monkeypatch, caplog):
    wrap_loss(monkeypatch, before=lambda batch, call: call == 2 and os.kill(os.getpid(), signal.SIGTERM))
    _, _, cfg = make_cfg("sashimi", "train.max_steps=5")
    result = start(cfg).train()
    assert result.stopped_by == "SIGTERM" and result.step == 2
    assert latest_checkpoint(cfg.run_dir).name == "step-2"
    assert "--resume auto" in caplog.text
    guard = signal.getsignal(signal.SIGTERM)  # repeats of the signal are dropped for a few seconds more
    assert isinstance(guard, trainer_lib.RepeatedSignalGuard) and guard.previous is signal.SIG_DFL
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_test_mode_fails_on_non_finite_loss(make_cfg, monkeypatch):
    wrap_loss(monkeypatch, after=lambda loss, call: loss * math.nan)
    _, _, cfg = make_cfg("sashimi")
    with pytest.raises(TrainingError, match="non-finite"):
        run_test_mode(cfg)
