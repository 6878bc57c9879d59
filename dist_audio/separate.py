"""Whole-track separation of any length: overlapping chunks, cross-faded back together.

The track and the output stay on the CPU; only a batch of fixed-size chunks is on the model's device
at a time, so device memory does not depend on the track's length. Each chunk's output is weighted
by a window with linear fades over the overlap and the weighted sum is divided by the summed weights,
so the weights of every sample add up to exactly one (also at the track's ends, where only one chunk
covers it).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["chunk_starts", "fade_window", "separate_track"]


def chunk_starts(length: int, chunk: int, hop: int) -> list[int]:
    """Starts of chunks of ``chunk`` samples every ``hop`` samples until the track is covered."""
    if length <= chunk:
        return [0]
    return [*range(0, length - chunk, hop), length - chunk]


def fade_window(chunk: int, fade: int) -> torch.Tensor:
    """``[chunk]`` weights: linear fade-in and fade-out over ``fade`` samples, 1 in between, never 0."""
    ramp = torch.arange(1, chunk + 1, dtype=torch.float32)
    return torch.minimum(torch.ones(chunk), torch.minimum(ramp, ramp.flip(0)) / (fade + 1))


@torch.inference_mode()
def separate_track(model: nn.Module, track: torch.Tensor, *, chunk: int, overlap: float = 0.25, batch_size: int = 4,
                   device: str | torch.device | None = None) -> torch.Tensor:
    """Separate a CPU track ``[c, n]`` into ``[s, c, n]`` (on the CPU) with ``model(mix [b, c, n]) -> [b, s, c, n]``.

    Chunks of ``chunk`` samples overlap by the fraction ``overlap``; a track no longer than one chunk
    goes through the model in one pass. ``batch_size`` chunks go to ``device`` at a time.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if chunk < 1 or batch_size < 1:
        raise ValueError("chunk and batch_size must be >= 1")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    channels, length = track.shape
    if length <= chunk:
        return model(track[None].to(device)).squeeze(0).float().cpu()
    hop = max(1, round(chunk * (1 - overlap)))
    window = fade_window(chunk, chunk - hop)
    starts = chunk_starts(length, chunk, hop)
    out: torch.Tensor | None = None
    weight = torch.zeros(length)
    for first in range(0, len(starts), batch_size):
        group = starts[first:first + batch_size]
        mix = torch.stack([track[:, s:s + chunk] for s in group]).to(device)
        separated = model(mix).float().cpu()  # [b, s, c, chunk]
        if out is None:
            out = torch.zeros(separated.shape[1], channels, length)
        for start, piece in zip(group, separated):
            out[..., start:start + chunk] += piece * window
            weight[start:start + chunk] += window
    return out.div_(weight)
