"""The global order of a training epoch: which sample, and which crop of it, each position holds.

An epoch is one fixed sequence of positions ``0 .. E-1`` (E = the manifest's training samples) that
depends only on the manifest, ``data.shuffle_buffer``, the seed, the epoch and a *stream* number (0 for
the examples; ``1 + s`` for stem ``s`` of a remix, so each stem has its own order). It never depends
on the world size, the worker count or the batch size, so any reader can compute any position from
scratch, and a resumed run on another layout reads the same examples.

- The shards are permuted (seeded by seed, epoch, stream) and their samples concatenated in tar order.
- The concatenation is cut into windows of ``shuffle_buffer`` samples, and each window is permuted with
  its own seed (seed, epoch, stream, window), so reads stay within a few neighbouring shards.
- Per-position draws (crop offsets, remix gains) come from ``counter_uniform(seed, epoch, stream,
  position, ...)``, a hash of its arguments: no random stream whose state depends on what was read before.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

import numpy as np

__all__ = ["EpochOrder", "counter_uniform"]

_MASK = (1 << 64) - 1
_WINDOWS_KEPT = 8  # window permutations cached per order (a reader works through nearby positions)


def _mix(x: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers that scatters every input bit."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def counter_uniform(*keys: int) -> float:
    """A number in [0, 1) that depends only on ``keys``: a counter-based random draw."""
    state = 0
    for key in keys:
        state = _mix(state ^ (key & _MASK))
    return (state >> 11) * 2.0**-53


class EpochOrder:
    """Position → (shard number in the manifest, sample number within that shard) for one epoch and stream."""

    def __init__(self, shard_samples: Sequence[int], window: int, seed: int, epoch: int, stream: int):
        self.seed, self.epoch, self.stream, self.window = seed, epoch, stream, window
        self.shards = np.random.default_rng([seed, epoch, stream, 0]).permutation(len(shard_samples)).tolist()
        self.sizes = [int(shard_samples[i]) for i in self.shards]
        self.ends = list(itertools.accumulate(self.sizes))  # end of each permuted shard in the concatenation
        self._windows: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, position: int) -> tuple[int, int]:
        if not 0 <= position < len(self):
            raise IndexError(f"position {position} is outside the epoch of {len(self)} samples")
        if self.window > 1:
            window, offset = divmod(position, self.window)
            position = window * self.window + self._permutation(window)[offset]
        slot = bisect.bisect_right(self.ends, position)
        return self.shards[slot], position - (self.ends[slot] - self.sizes[slot])

    def _permutation(self, window: int) -> list[int]:
        if window not in self._windows:
            if len(self._windows) >= _WINDOWS_KEPT:
                self._windows.clear()
            size = min(self.window, len(self) - window * self.window)
            rng = np.random.default_rng([self.seed, self.epoch, self.stream, 1, window])
            self._windows[window] = rng.permutation(size).tolist()
        return self._windows[window]
