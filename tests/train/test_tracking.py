"""Trackers (log.trackers), the spectrogram figures and progress.json, on the real debug models."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_audio.config import TRACKER_MODULES, ConfigError, load_config
from dist_audio.metrics import usdr
from dist_audio.train.figures import preview_figure
from launch import train as launch_train

SASHIMI = Path(__file__).resolve().parents[2] / "configs/sashimi/debug.yaml"


def cli_args(path, overrides):
    return ["--config", str(path), *[arg for item in overrides for arg in ("--set", item)], "--overwrite"]


def test_trackers_default_and_the_older_tensorboard_key():
    assert load_config(SASHIMI).log.trackers == ["tensorboard"]
    assert load_config(SASHIMI, ["log.tensorboard=false"]).log.trackers == []
    assert load_config(SASHIMI, ["log.tensorboard=true"]).log.trackers == ["tensorboard"]
    assert load_config(SASHIMI, ["log.trackers=[mlflow]", "log.tensorboard=true"]).log.trackers == ["tensorboard",
                                                                                                     "mlflow"]
    with pytest.raises(ConfigError, match=r"log.tensorboard.*expected true or false"):
        load_config(SASHIMI, ["log.tensorboard=1"])
    with pytest.raises(ConfigError, match=r"log.trackers.*unknown tracker 'tensorbord'"):
        load_config(SASHIMI, ["log.trackers=[tensorbord]"])
    with pytest.raises(ConfigError, match=r"log.trackers.*twice"):
        load_config(SASHIMI, ["log.trackers=[tensorboard, tensorboard]"])


def test_a_tracker_not_installed_exits_2_naming_log_trackers(make_cfg, capsys):
    missing = next((name for name, module in TRACKER_MODULES.items() if importlib.util.find_spec(module) is None), None)
    if missing is None:
        pytest.skip("every supported tracker is installed here")
    path, overrides, cfg = make_cfg("sashimi", f"log.trackers=[tensorboard, {missing}]")
    assert launch_train.main(cli_args(path, overrides)) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: config error at 'log.trackers'") and f"'{missing}' is not installed" in error
    assert not cfg.run_dir.exists()  # refused before anything was written


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow not installed (dev extra)")
def test_mlflow_receives_the_scalars_tensorboard_does(make_cfg, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path, overrides, cfg = make_cfg("sashimi", "log.trackers=[tensorboard, mlflow]", "train.max_steps=3",
                                    "train.val_every=3")
    assert launch_train.main(cli_args(path, overrides)) == 0

    events = EventAccumulator(str(cfg.run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tensorboard = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    mlflow.set_tracking_uri(f"sqlite:///{cfg.run_dir.resolve() / 'mlflow.db'}")
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("dist_audio").experiment_id])
    assert run.info.run_name == cfg.train.name and run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == str(cfg.optim.lr)  # the flattened run config
    from_mlflow = {tag: {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag)}
                   for tag in run.data.metrics}
    assert set(from_mlflow) == set(tensorboard)
    assert {"train/loss", "val/bits_per_sample", "mem/peak_gib", "final/train_loss"} <= set(tensorboard)
    for tag, values in tensorboard.items():
        if tag.startswith("final/"):  # TensorBoard's HPARAMS tab files them at step 0
            values = {cfg.train.max_steps: values[0]}
        assert from_mlflow[tag].keys() == values.keys(), tag
        for step, value in values.items():  # TensorBoard stores float32
            assert from_mlflow[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-30), (tag, step)
    image = events.Images("spectrogram/0")[-1]
    assert image.width > 600 and image.height > 200  # real and generated side by side, axes and colour bar


def test_progress_file_follows_the_run(make_cfg):
    path, overrides, cfg = make_cfg("sashimi", "train.max_steps=3", "log.every=1")
    assert launch_train.main(cli_args(path, overrides)) == 0
    progress = json.loads((cfg.run_dir / "progress.json").read_text())
    assert progress["step"] == progress["max_steps"] == 3 and progress["eta_s"] == 0
    assert math.isfinite(progress["loss"]) and progress["samples_per_s"] > 0


def _texts(figure):
    axes = [ax for ax in figure.axes if ax.get_title()]
    return axes, [ax.get_title() for ax in axes]


def test_separation_figure_pairs_target_and_estimate_with_the_stem_sdr():
    torch.manual_seed(0)
    sources = ["drums", "bass"]
    targets = {stem: 0.3 * torch.randn(2, 4000) for stem in sources}
    estimates = {"drums": targets["drums"] + 0.1 * torch.randn(2, 4000), "bass": 0.5 * targets["bass"]}
    preview = {"mixture": sum(targets.values()), **estimates, **{f"target/{s}": t for s, t in targets.items()}}
    figure = preview_figure(preview, 16000, "step 3")
    axes, titles = _texts(figure)
    for stem in sources:
        sdr = usdr(targets[stem], estimates[stem]).item()
        assert f"{stem}: target" in titles and f"{stem}: estimate, SDR {sdr:.1f} dB" in titles
    assert titles[:2] == ["drums: target", f"drums: estimate, SDR {usdr(targets['drums'], estimates['drums']):.1f} dB"]
    assert all(ax.get_yscale() == "log" for ax in axes)
    assert [ax.get_xlabel() for ax in axes] == ["", "", "time (s)", "time (s)"]
    assert [ax.get_ylabel() for ax in axes] == ["frequency (Hz)", "", "frequency (Hz)", ""]
    (colorbar,) = [ax for ax in figure.axes if not ax.get_title()]
    assert "dB" in colorbar.get_ylabel()
    low, high = axes[0].get_ylim()
    assert low == 20 and high == 8000  # Hz, up to Nyquist at 16 kHz


def test_generation_figure_shows_a_real_clip_beside_a_generated_one():
    figure = preview_figure({"generated": 0.1 * torch.randn(1, 2000), "real": 0.1 * torch.randn(1, 2000)}, 16000, "x")
    _, titles = _texts(figure)
    assert titles == ["real (validation clip)", "generated"]
