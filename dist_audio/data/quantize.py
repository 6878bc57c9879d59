"""Waveform ↔ integer levels for autoregressive models, with SaShiMi's conventions.

Audio in [-1, 1] maps to ``2**bits`` levels. ``mu-law`` compands first (finer steps near zero, where
speech and music spend most of their time); ``linear`` does not. Both use the same level grid as the
SaShiMi reference: ``q = floor(u * (2**bits - eps) + eps / 2)`` for ``u`` in [0, 1], decoded as
``2 * q / (2**bits - 1) - 1``. Silence maps to ``zero_level`` (``2**(bits - 1)``), which is also the
first input token of every sequence. Unlike the reference we do not min-max scale each crop: levels
keep the recording's loudness, and inputs outside [-1, 1] are clipped.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

__all__ = ["QuantizationKind", "dequantize", "levels", "pcm16_table", "quantize", "zero_level"]

QuantizationKind = Literal["mu-law", "linear"]

_EPS = 0.01  # keeps u = 1 inside the top level instead of one past it


def levels(bits: int) -> int:
    _check_bits(bits)
    return 1 << bits


def zero_level(bits: int, kind: QuantizationKind = "mu-law") -> int:
    """The level that silence maps to (the same for both kinds: the middle of the grid)."""
    _check_kind(kind)
    return levels(bits) // 2


def quantize(x: torch.Tensor, bits: int = 8, kind: QuantizationKind = "mu-law") -> torch.Tensor:
    """Float audio in [-1, 1] → Long levels in [0, 2**bits)."""
    _check_kind(kind)
    q_levels = levels(bits)
    x = x.to(torch.float32).clamp(-1.0, 1.0)  # a new tensor: the in-place steps below leave the input alone
    if kind == "mu-law":
        mu = q_levels - 1
        # log(1 + mu|x|) rather than log1p: the argument is >= 1, so it is as accurate, and many times faster on CPU;
        # copysign restores the sign in one pass (same values as multiplying by sign(x), zero included)
        x = x.abs().mul_(mu).add_(1).log_().copysign_(x).div_(math.log1p(mu))
    levels_float = x.add_(1).mul_((q_levels - _EPS) / 2).add_(_EPS / 2)  # u = (x + 1) / 2 scaled to levels
    # the values are >= eps / 2 > 0, so truncation by .long() is the floor of the level grid
    return levels_float.long().clamp_(0, q_levels - 1)


def pcm16_table(bits: int = 8, kind: QuantizationKind = "mu-law", channels: int = 1) -> np.ndarray:
    """``quantize`` by table lookup: the level of every mean of ``channels`` (1 or 2) 16-bit PCM samples.

    Index the table with the samples' sum modulo ``65536 × channels`` (for one channel, the int16 samples
    viewed as uint16). The values are those float decoding gives (sample / 32768; the mean of two is
    exact too), so the levels equal ``quantize`` of the float crop, at a fraction of its cost.
    """
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 or 2, got {channels}")
    span = 65536 * channels
    sums = torch.arange(span, dtype=torch.float32)
    sums[span // 2 :] -= span  # index i holds the sum i, or i - span for the negative half
    table = quantize(sums / (32768 * channels), bits, kind).numpy()
    return table.astype(np.uint8 if bits <= 8 else np.uint16)  # small enough to stay in cache


def dequantize(q: torch.Tensor, bits: int = 8, kind: QuantizationKind = "mu-law") -> torch.Tensor:
    """Long levels → float32 audio in [-1, 1] (the inverse of ``quantize`` up to one level)."""
    _check_kind(kind)
    q_levels = levels(bits)
    y = 2 * q.to(torch.float64) / (q_levels - 1) - 1
    if kind == "mu-law":
        mu = q_levels - 1
        y = torch.sign(y) * ((1 + mu) ** y.abs() - 1) / mu
    return y.to(torch.float32)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")


def _check_kind(kind: str) -> None:
    if kind not in ("mu-law", "linear"):
        raise ValueError(f"quantization kind must be 'mu-law' or 'linear', got {kind!r}")
