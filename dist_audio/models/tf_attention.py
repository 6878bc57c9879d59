"""Self-attention over a spectrogram feature map: along time (TSA), along frequency (FSA), in windows.

Every flavour is the same operation, multi-head attention inside non-overlapping blocks of the
``[t, f]`` grid, with a different block shape:

- TSA: blocks of ``t × 1``, one sequence per frequency bin;
- FSA: blocks of ``1 × f``, one sequence per frame;
- window attention (Swin): blocks of ``wt × wf``; the *shifted* variant starts the block grid half a
  window late on both axes.

Swin computes shifted windows by rolling the map and masking the windows that straddle the
wrap-around. Here the shifted grid is cut directly in the unrolled map: the pieces at the two ends
(which Swin's mask keeps apart inside its wrap-around windows) are just smaller blocks. It is the
same attention (``tests/models/test_tf_attention.py`` checks it against the rolled-and-masked
reference), but it needs neither a roll nor a mask, so every call is a plain
``F.scaled_dot_product_attention`` on 4-D tensors that takes the fused kernels: no attention matrix
is stored and memory grows linearly with ``t × f``. Maps whose size is not a multiple of the window
get a smaller block at the end instead of padding.

Axis letters: ``b`` batch, ``t`` frames, ``f`` frequency bins, ``d`` channels, ``h`` heads.
"""

from __future__ import annotations

import abc
import itertools

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AxisAttention", "FrequencyAttention", "TimeAttention", "WindowAttention", "axis_segments"]


def axis_segments(size: int, window: int, shifted: bool) -> list[tuple[int, int, int]]:
    """Cut one axis of ``size`` into windows; returns runs ``(start, stop, block)`` of equal blocks.

    The window shrinks to ``size`` when the axis is shorter (and is then not shifted, as in Swin).
    A shifted grid starts ``window // 2`` late, so the first piece is half a window long.
    """
    window = min(window, size)
    shift = window // 2 if shifted and size > window else 0
    starts = [0, *range(shift or window, size, window)]
    pieces = [(a, b) for a, b in zip(starts, [*starts[1:], size])]
    runs: list[tuple[int, int, int]] = []
    for length, group in itertools.groupby(pieces, key=lambda p: p[1] - p[0]):
        group = list(group)
        runs.append((group[0][0], group[-1][1], length))
    return runs


class AxisAttention(nn.Module, abc.ABC):
    """Multi-head self-attention inside blocks of a channels-last map ``[b, t, f, d]``.

    Subclasses choose the blocks (``segments``); the projections are shared code.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    @abc.abstractmethod
    def segments(self, t: int, f: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
        """Runs of blocks along time and along frequency (see ``axis_segments``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[b, t, f, d]`` → ``[b, t, f, d]``."""
        t, f = x.shape[1:3]
        qkv = self.qkv(x)
        time_runs, freq_runs = self.segments(t, f)
        rows = []
        for t0, t1, bt in time_runs:
            row = [self._attend_blocks(qkv[:, t0:t1, f0:f1], bt, bf) for f0, f1, bf in freq_runs]
            rows.append(row[0] if len(row) == 1 else torch.cat(row, dim=2))
        return rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)

    def _attend_blocks(self, qkv: torch.Tensor, bt: int, bf: int) -> torch.Tensor:
        """Attention within each ``bt × bf`` block of ``qkv [b, t, f, 3d]`` (t, f multiples of bt, bf),
        projected: ``[b, t, f, d]``."""
        b, t, f, three_d = qkv.shape
        h, hd = self.heads, three_d // (3 * self.heads)
        nt, nf, n, length = t // bt, f // bf, b * (t // bt) * (f // bf), bt * bf
        # [b, nt, bt, nf, bf, 3, h, hd] -> [3, blocks, length, h, hd]; q, k, v are 4-D, so SDPA's fused kernels apply
        qkv = qkv.reshape(b, nt, bt, nf, bf, 3, h, hd).permute(5, 0, 1, 3, 2, 4, 6, 7)
        qkv = qkv.reshape(3, n, length, h, hd).contiguous()
        q, k, v = qkv.transpose(2, 3).unbind(0)
        # the output keeps the query's [blocks, length, h, hd] layout, so this is a view and the projection
        # saves for backward the very tensor that attention already saves
        out = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, h * hd))
        return out.reshape(b, nt, nf, bt, bf, h * hd).permute(0, 1, 3, 2, 4, 5).reshape(b, t, f, h * hd)


class TimeAttention(AxisAttention):
    """TSA: each frequency bin attends over all frames."""

    def segments(self, t, f):
        return [(0, t, t)], [(0, f, 1)]


class FrequencyAttention(AxisAttention):
    """FSA: each frame attends over all frequency bins."""

    def segments(self, t, f):
        return [(0, t, 1)], [(0, f, f)]


class WindowAttention(AxisAttention):
    """Swin window attention over ``window = (frames, bins)`` blocks, optionally shifted by half."""

    def __init__(self, dim: int, heads: int, window: tuple[int, int], shifted: bool):
        super().__init__(dim, heads)
        self.window = tuple(window)
        self.shifted = shifted

    def segments(self, t, f):
        return axis_segments(t, self.window[0], self.shifted), axis_segments(f, self.window[1], self.shifted)

    def extra_repr(self) -> str:
        return f"window={self.window}, shifted={self.shifted}"
