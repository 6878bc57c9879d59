"""Experiment tracking through Accelerate's trackers (main process only), plus memory measurement.

``log.trackers`` names the trackers (``tensorboard`` by default; ``mlflow``, ``wandb``, ``aim`` when
installed); every one receives the same scalars, and each keeps its files in the run directory unless
its own environment variables point elsewhere: ``tb/`` (TensorBoard), ``mlflow.db`` and
``mlflow-artifacts/`` (MLflow, unless ``MLFLOW_TRACKING_URI``), ``wandb/`` (``WANDB_MODE=offline``
needs no network), ``.aim/``. The flattened run config goes to each non-TensorBoard tracker at the start
(MLflow params, W&B config, Aim hparams) and to TensorBoard's HPARAMS tab at the end.

Tags written (issue 5): ``train/*``, ``val/*``, ``opt/lr``, ``opt/grad_norm``, ``perf/*``,
``mem/peak_gib`` (and ``mem/peak_gib/rank<r>`` with several ranks), ``data/skipped_samples``,
``train/skipped_steps``, ``mem/oom_retries``; in TensorBoard at each validation ``audio/<name>/ch<c>``
(one mono clip per channel) and ``spectrogram/<example>`` (``figures.preview_figure``); at the end the
hparams with the final metrics. ``progress.json`` in the run directory holds the latest step, loss,
samples/s and ETA, for anything that follows a run without reading event files (``launch/demo.py``).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import AimTracker, GeneralTracker, MLflowTracker, TensorBoardTracker, WandBTracker

from dist_audio.config import LogConfig, RunConfig, config_to_dict
from dist_audio.train.durable import optional_writer
from dist_audio.train.figures import preview_figure

TRACKER_DIR = "tb"  # TensorBoard's run name: events land in <run_dir>/tb/
PROGRESS_FILE = "progress.json"
PROJECT = "dist_audio"  # the MLflow experiment and W&B project a run is filed under
# a full disk stops the run's logging (events, progress.json) with one warning, not the run
optional_writes = optional_writer("logging (trackers, progress.json)")


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated on a GPU, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def make_trackers(log_cfg: LogConfig, run_dir: Path, run_name: str) -> list[GeneralTracker]:
    """The ``Accelerator(log_with=...)`` trackers of ``log.trackers``, each writing under ``run_dir``.

    Built on every rank (constructors only store their arguments); Accelerate starts them on the main one.
    """
    run_dir = Path(run_dir).resolve()
    trackers: list[GeneralTracker] = []
    for name in log_cfg.trackers:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(TRACKER_DIR, run_dir))
        elif name == "mlflow":
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI"):
                mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
            trackers.append(MLflowTracker(PROJECT, (run_dir / "mlflow-artifacts").as_uri(), run_name=run_name))
        elif name == "wandb":
            trackers.append(WandBTracker(PROJECT, name=run_name, dir=str(run_dir)))
        elif name == "aim":
            trackers.append(AimTracker(run_name, run_dir))
        else:  # LogConfig.validate admits only the names above
            raise ValueError(f"unknown tracker {name!r}")
    return trackers


class Tracking:
    """Scalars to every tracker; audio, figures and hparams to TensorBoard; a no-op on all but the main rank."""

    @optional_writes
    def __init__(self, accelerator: Accelerator, cfg: RunConfig):
        self.accelerator = accelerator
        self.run_dir = Path(cfg.run_dir)
        self.max_steps = cfg.train.max_steps
        self.writer = None
        self.enabled = bool(cfg.log.trackers) and accelerator.is_main_process
        if cfg.log.trackers:
            accelerator.init_trackers(TRACKER_DIR)
            if "tensorboard" in cfg.log.trackers and accelerator.is_main_process:
                self.writer = accelerator.get_tracker("tensorboard", unwrap=True)
            if accelerator.is_main_process:
                flat = flat_config(cfg)
                for tracker in accelerator.trackers:
                    if tracker.name != "tensorboard":
                        tracker.store_init_configuration(flat)

    @optional_writes
    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.enabled:
            self.accelerator.log({k: float(v) for k, v in values.items()}, step=step)

    @optional_writes
    def progress(self, step: int, scalars: Mapping[str, float]) -> None:
        """Rewrite ``progress.json``: step, loss, samples/s and the ETA at the latest step time."""
        if not self.accelerator.is_main_process:
            return
        remaining = (self.max_steps - step) * scalars["perf/step_time_s"]
        record = {"step": step, "max_steps": self.max_steps, "loss": _finite_or_none(scalars["train/loss"]),
                  "samples_per_s": scalars["perf/samples_per_s"], "eta_s": remaining, "time": time.time()}
        path = self.run_dir / PROGRESS_FILE
        temporary = path.with_name(f".{PROGRESS_FILE}.tmp")
        temporary.write_text(json.dumps(record) + "\n")
        os.replace(temporary, path)  # a reader never sees half a file

    @optional_writes
    def audio(self, clips: Mapping[str, torch.Tensor], sample_rate: int, step: int) -> None:
        """``clips`` maps ``<name>/<example>`` to ``[C, T]``: one mono audio tag per channel of each clip
        and one spectrogram figure per example."""
        if self.writer is None:
            return
        examples: dict[str, dict[str, torch.Tensor]] = {}
        for key, clip in clips.items():
            clip = clip.detach().float().cpu().clamp(-1, 1)
            name, _, example = key.rpartition("/")
            examples.setdefault(example, {})[name] = clip
            for channel, mono in enumerate(clip):
                self.writer.add_audio(f"audio/{key}/ch{channel}", mono, step, sample_rate=sample_rate)
        for example, preview in examples.items():
            figure = preview_figure(preview, sample_rate, f"step {step}, validation example {example}")
            self.writer.add_figure(f"spectrogram/{example}", figure, step)
        self.writer.flush()

    @optional_writes
    def hparams(self, cfg: RunConfig, final_metrics: Mapping[str, float]) -> None:
        """The final metrics as ``final/*``: next to the flattened config in TensorBoard's HPARAMS tab, as
        scalars at the last step in the other trackers (which got the config at the start)."""
        if not self.enabled:
            return
        metrics = {f"final/{key}": float(value) for key, value in final_metrics.items()}
        for tracker in self.accelerator.trackers:
            if tracker.name != "tensorboard":
                tracker.log(metrics, step=cfg.train.max_steps)
        if self.writer is not None:
            self.writer.add_hparams(flat_config(cfg), metrics, run_name=".", global_step=None)
            self.writer.flush()

    @optional_writes
    def flush(self) -> None:
        """Write out what was logged so far (also on errors); ``accelerator.end_training()`` finishes the
        trackers at the end of the run (the process group stays up until then)."""
        if self.writer is not None:
            self.writer.flush()


def flat_config(cfg: RunConfig) -> dict[str, int | float | str | bool]:
    """``{"optim.lr": 0.003, ...}``, lists and None as strings: what every tracker accepts as hparams."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in _flatten(config_to_dict(cfg)).items()}


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
