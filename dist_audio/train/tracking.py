"""TensorBoard logging through Accelerate's tracker (main process only), plus memory measurement.

Tags written (issue 5): ``train/*``, ``val/*``, ``opt/lr``, ``opt/grad_norm``, ``perf/*``,
``mem/peak_gib`` (and ``mem/peak_gib/rank<r>`` with several ranks), ``data/skipped_samples``,
``train/skipped_steps``, ``mem/oom_retries``; at each validation ``audio/<name>/ch<c>`` (one mono
clip per channel) and ``spectrogram/<name>``; at the end the hparams with the final metrics.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from matplotlib import colormaps

from dist_audio.config import LogConfig, RunConfig, config_to_dict
from dist_audio.train.durable import optional_writer

TRACKER_DIR = "tb"  # the tracker's run name: events land in <run_dir>/tb/
tensorboard_writes = optional_writer("TensorBoard logging")  # a full disk stops the events, not the run


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated on a GPU, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


class Tracking:
    """Scalars, audio, spectrograms and hparams for one run; a no-op on every rank but the main one."""

    @tensorboard_writes
    def __init__(self, accelerator: Accelerator, log_cfg: LogConfig, run_dir: Path):
        self.accelerator = accelerator
        self.writer = None
        if log_cfg.tensorboard:
            accelerator.init_trackers(TRACKER_DIR)
            if accelerator.is_main_process:
                self.writer = accelerator.get_tracker("tensorboard", unwrap=True)
        self.log_dir = Path(run_dir) / TRACKER_DIR

    @tensorboard_writes
    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            self.accelerator.log(dict(values), step=step)

    @tensorboard_writes
    def audio(self, clips: Mapping[str, torch.Tensor], sample_rate: int, step: int) -> None:
        """One mono tag per channel of each ``[C, T]`` clip, and one spectrogram image per clip."""
        if self.writer is None:
            return
        for name, clip in clips.items():
            clip = clip.detach().float().cpu().clamp(-1, 1)
            for channel, mono in enumerate(clip):
                self.writer.add_audio(f"audio/{name}/ch{channel}", mono, step, sample_rate=sample_rate)
            self.writer.add_image(f"spectrogram/{name}", spectrogram_image(clip.mean(0)), step, dataformats="HWC")
        self.writer.flush()

    @tensorboard_writes
    def hparams(self, cfg: RunConfig, final_metrics: Mapping[str, float]) -> None:
        """The flattened config next to the final metrics (TensorBoard's HPARAMS tab)."""
        if self.writer is None:
            return
        hparams = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                   for key, value in _flatten(config_to_dict(cfg)).items()}
        metrics = {f"final/{key}": value for key, value in final_metrics.items()}
        self.writer.add_hparams(hparams, metrics, run_name=".", global_step=None)
        self.writer.flush()

    @tensorboard_writes
    def close(self) -> None:
        """Flush and close the event files (the process group stays up, unlike ``end_training``)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()


def spectrogram_image(mono: torch.Tensor, n_fft: int = 512) -> np.ndarray:
    """Log-magnitude STFT of a mono clip as an RGB image (low frequencies at the bottom)."""
    n_fft = min(n_fft, max(16, 2 ** int(np.log2(max(mono.numel(), 16)))))
    window = torch.hann_window(n_fft)
    magnitude = torch.stft(mono, n_fft, hop_length=n_fft // 4, window=window, return_complex=True).abs()
    decibels = 20 * torch.log10(magnitude.clamp_min(1e-5))
    decibels = (decibels - decibels.max()).clamp_min(-80) / 80 + 1  # [0, 1], 80 dB range
    rgb = colormaps["magma"](decibels.flip(0).numpy())[..., :3]
    return (rgb * 255).astype(np.uint8)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
