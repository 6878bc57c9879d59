"""Spectrogram figures of the validation previews, for TensorBoard (drawn like ``launch/plan.py --plot``).

Every panel has time in seconds, frequency in Hz on a log axis and one colour bar in dB shared by the
whole figure, so two panels can be compared by eye. ``preview_figure`` reads what an objective's
``preview`` returns: ``generated`` and ``real`` (SaShiMi: a generated clip beside a real one), or
``mixture``, the separated stems and ``target/<stem>`` (TF-SWA: per stem the target and the estimate
side by side, the clip's SDR of that stem in the title).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator

from dist_audio.metrics import usdr

DYNAMIC_RANGE_DB = 80.0
WINDOW_SECONDS = 0.032  # STFT window: 32 ms (512 samples at 16 kHz)
LOWEST_HZ = 20.0  # where the log frequency axis starts (or the first bin above 0 Hz, if higher)


def spectrogram_db(clip: torch.Tensor, sample_rate: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Power spectrogram of a ``[C, T]`` (or ``[T]``) clip averaged over channels, in dB re 1.0 full scale.

    Returns ``(decibels[F, N], bin edges in Hz [F + 1], frame edges in s [N + 1])`` without the 0 Hz bin,
    which has no place on a log axis. Short clips get a shorter window, so there are at least 8 frames.
    """
    clip = clip.detach().float().cpu().reshape(-1, clip.shape[-1])
    length = clip.shape[-1]
    n_fft = 2 ** round(np.log2(WINDOW_SECONDS * sample_rate))
    n_fft = int(max(16, min(n_fft, 2 ** int(np.log2(max(length // 2, 16))))))
    hop = n_fft // 4
    spectrum = torch.stft(clip, n_fft, hop_length=hop, window=torch.hann_window(n_fft), center=True,
                          return_complex=True)
    power = spectrum.abs().square().mean(0) / (torch.hann_window(n_fft).sum() ** 2 / 4)  # a full-scale sine: 0 dB
    decibels = 10 * torch.log10(power.clamp_min(1e-12))[1:].numpy()
    bin_hz = sample_rate / n_fft
    freq_edges = np.minimum((np.arange(1, decibels.shape[0] + 2) - 0.5) * bin_hz, sample_rate / 2)
    time_edges = (np.arange(decibels.shape[1] + 1) - 0.5) * hop / sample_rate
    return decibels, freq_edges, np.clip(time_edges, 0, length / sample_rate)


def _hz(value: float, _position: int) -> str:
    return f"{value / 1000:g}k" if value >= 1000 else f"{value:g}"


def _panel(ax, spectrogram: tuple[np.ndarray, np.ndarray, np.ndarray], title: str, top_db: float,
           *, x_label: bool, y_label: bool):
    decibels, freq_edges, time_edges = spectrogram
    mesh = ax.pcolormesh(time_edges, freq_edges, decibels, cmap="magma", vmin=top_db - DYNAMIC_RANGE_DB,
                         vmax=top_db, shading="flat", rasterized=True)
    ax.set_yscale("log")
    ax.set_ylim(max(LOWEST_HZ, freq_edges[0]), freq_edges[-1])
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(_hz))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    if x_label:
        ax.set_xlabel("time (s)", fontsize=8)
    if y_label:
        ax.set_ylabel("frequency (Hz)", fontsize=8)
    return mesh


def _grid(panels: list[list[tuple[str, torch.Tensor]]], sample_rate: int, title: str) -> Figure:
    """A figure of spectrogram panels ``rows × columns`` of (title, clip), one shared colour bar."""
    spectrograms = [[spectrogram_db(clip, sample_rate) for _, clip in row] for row in panels]
    top_db = max(max(s[0].max() for s in row) for row in spectrograms)
    top_db = float(np.ceil(top_db / 10) * 10)
    rows, columns = len(panels), len(panels[0])
    width, height = 4.4 * columns + 1.6, 2.2 * rows + 0.9  # inches; fixed margins (constrained layout is slow)
    figure = Figure(figsize=(width, height), dpi=100)
    figure.subplots_adjust(left=0.7 / width, right=1 - 1.1 / width, bottom=0.5 / height, top=1 - 0.55 / height,
                           wspace=0.08, hspace=0.35)
    axes = figure.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
    mesh = None
    for r, row in enumerate(panels):
        for c, (panel_title, _) in enumerate(row):
            mesh = _panel(axes[r][c], spectrograms[r][c], panel_title, top_db, x_label=r == rows - 1, y_label=c == 0)
    bar_axes = figure.add_axes((1 - 0.95 / width, 0.5 / height, 0.15 / width, 1 - 1.05 / height))
    colorbar = figure.colorbar(mesh, cax=bar_axes)
    colorbar.set_label("power (dB re full scale)", fontsize=8)
    colorbar.ax.tick_params(labelsize=7)
    figure.suptitle(title, fontsize=10, y=1 - 0.08 / height, va="top")
    return figure


def generation_figure(generated: torch.Tensor, real: torch.Tensor, sample_rate: int, title: str) -> Figure:
    """A real clip beside a generated one (``[C, T]`` each)."""
    return _grid([[("real (validation clip)", real), ("generated", generated)]], sample_rate, title)


def separation_figure(targets: Mapping[str, torch.Tensor], estimates: Mapping[str, torch.Tensor],
                      sample_rate: int, title: str) -> Figure:
    """Per stem (one row each) the target and the estimate side by side, with this clip's SDR of the stem."""
    rows = []
    for stem, target in targets.items():
        estimate = estimates[stem]
        sdr = usdr(target.float().reshape(-1, target.shape[-1]), estimate.float().reshape(-1, estimate.shape[-1]))
        rows.append([(f"{stem}: target", target), (f"{stem}: estimate, SDR {sdr.item():.1f} dB", estimate)])
    return _grid(rows, sample_rate, title)


def preview_figure(clips: Mapping[str, torch.Tensor], sample_rate: int, title: str) -> Figure:
    """The figure for one objective preview (see the module docstring for the two layouts)."""
    if "generated" in clips:
        return generation_figure(clips["generated"], clips["real"], sample_rate, title)
    targets = {name.removeprefix("target/"): clip for name, clip in clips.items() if name.startswith("target/")}
    if not targets:
        raise ValueError(f"no figure for a preview of {sorted(clips)}: expected 'generated' or 'target/<stem>'")
    return separation_figure(targets, {stem: clips[stem] for stem in targets}, sample_rate, title)

