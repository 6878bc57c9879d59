"""Evaluation metrics: source-to-distortion ratios for separation, bits per sample for waveform models.

- ``usdr``: the "utterance" SDR of the Music Demixing challenges, 10·log10(Σs² / Σ(s−ŝ)²) over a
  whole track (channels and time together), per stem; reported as the mean over tracks.
- ``csdr``: the "chunk" SDR of SiSEC 2018 style tables: the same ratio in 1 s frames, median over
  the frames of a track (frames where the reference is silent are skipped), then median over tracks.
- ``bsseval_sdr``: BSSEval v4 SDR through the optional ``museval`` package, which also forgives a
  short time-invariant distortion filter; slower, for comparison with published figures.
- ``bits_per_sample``: a negative log-likelihood in nats per sample, in bits.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["bits_per_sample", "bsseval_sdr", "csdr", "frame_sdr", "usdr"]

EPS = 1e-7  # the MDX challenge's stabiliser on both sides of the ratio


def usdr(reference: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """SDR in dB over the last two axes ``[..., channels, time]`` → ``[...]``."""
    if reference.shape != estimate.shape:
        raise ValueError(f"reference {tuple(reference.shape)} and estimate {tuple(estimate.shape)} differ")
    reference, estimate = reference.double(), estimate.double()
    signal = reference.square().sum(dim=(-2, -1))
    error = (reference - estimate).square().sum(dim=(-2, -1))
    return (10 * torch.log10((signal + EPS) / (error + EPS))).float()


def frame_sdr(reference: torch.Tensor, estimate: torch.Tensor, frame: int) -> torch.Tensor:
    """SDR of each whole ``frame``-sample frame: ``[..., channels, time]`` → ``[..., frames]``.

    Frames whose reference is silent are NaN (BSSEval skips them too); a trailing partial frame is dropped.
    """
    if reference.shape != estimate.shape:
        raise ValueError(f"reference {tuple(reference.shape)} and estimate {tuple(estimate.shape)} differ")
    frames = reference.shape[-1] // frame
    if frames == 0:
        raise ValueError(f"the signal ({reference.shape[-1]} samples) is shorter than one frame ({frame})")
    cut = frames * frame
    ref = reference[..., :cut].double().unflatten(-1, (frames, frame))  # [..., c, frames, frame]
    est = estimate[..., :cut].double().unflatten(-1, (frames, frame))
    signal = ref.square().sum(dim=(-3, -1))
    error = (ref - est).square().sum(dim=(-3, -1))
    sdr = 10 * torch.log10((signal + EPS) / (error + EPS))
    return sdr.masked_fill(signal == 0, math.nan).float()


def csdr(references: Sequence[torch.Tensor], estimates: Sequence[torch.Tensor], sample_rate: int,
         frame_seconds: float = 1.0) -> torch.Tensor:
    """Per-stem cSDR over tracks: each track ``[stems, channels, time]`` (tracks may differ in length).

    Median over a track's frames per stem, then median over tracks → ``[stems]``.
    """
    if len(references) != len(estimates) or not references:
        raise ValueError("need one estimate per reference and at least one track")
    frame = round(frame_seconds * sample_rate)
    per_track = torch.stack([frame_sdr(r, e, frame).nanmedian(dim=-1).values
                             for r, e in zip(references, estimates)])
    return per_track.nanmedian(dim=0).values


def bsseval_sdr(reference: torch.Tensor, estimate: torch.Tensor, sample_rate: int,
                frame_seconds: float = 1.0) -> torch.Tensor:
    """BSSEval v4 SDR of one track ``[stems, channels, time]``, median over frames → ``[stems]``.

    Needs the optional ``museval`` package (``pip install dist_audio[bsseval]``).
    """
    frame = round(frame_seconds * sample_rate)
    # museval wants [sources, time, channels]; v4 = one distortion filter per track, images version
    sdr, _isr, _sir, _sar, _perm = _museval_metrics().bss_eval(
        reference.permute(0, 2, 1).double().numpy(), estimate.permute(0, 2, 1).double().numpy(),
        window=frame, hop=frame, compute_permutation=False, framewise_filters=False, bsseval_sources_version=False,
    )
    return torch.from_numpy(np.nanmedian(sdr, axis=1)).float()


def _museval_metrics():
    """``museval.metrics`` without ``museval/__init__``, which imports musdb → stempeg → needs ffmpeg."""
    spec = importlib.util.find_spec("museval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("bsseval_sdr needs the museval package: pip install museval")
    path = Path(spec.submodule_search_locations[0]) / "metrics.py"
    module_spec = importlib.util.spec_from_file_location("_museval_metrics", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def bits_per_sample(nll_nats: torch.Tensor | float) -> torch.Tensor | float:
    """Negative log-likelihood per sample in nats → bits per sample."""
    return nll_nats / math.log(2)
