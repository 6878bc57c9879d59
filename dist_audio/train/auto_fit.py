"""``train.auto_fit``: survive an out-of-memory step by splitting each loaded batch into more micro-batches.

The loader keeps producing batches of ``data.batch_size``; after an OOM each loaded batch is cut into
twice as many micro-batches and gradients are accumulated over them, weighted by their share of the
step's samples. The global batch, the data order and the loss trajectory stay the same; only peak
activation memory drops. The failed step is retried on the same data.
"""

from __future__ import annotations

import gc
import logging
import math
from typing import Any

import torch

logger = logging.getLogger(__name__)

Batch = dict[str, Any]


class AutoFitExhausted(RuntimeError):
    """Out of memory even at micro-batch 1: nothing left to halve."""


def batch_size(batch: Batch) -> int:
    return len(batch["keys"])


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """Cut a batch along its first dimension into up to ``parts`` consecutive micro-batches.

    Tensors and lists with one entry per sample are sliced; anything else (``skipped``, a 0-d count) is
    a per-batch value and stays with the first micro-batch only, so sums over micro-batches are unchanged.
    """
    size = batch_size(batch)
    step = math.ceil(size / parts)
    pieces = []
    for start in range(0, size, step):
        piece = {}
        for key, value in batch.items():
            per_sample = (isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size) or (
                isinstance(value, list) and len(value) == size)
            if per_sample:
                piece[key] = value[start:start + step]
            elif start == 0 or not isinstance(value, torch.Tensor):
                piece[key] = value
            else:
                piece[key] = torch.zeros_like(value)
        pieces.append(piece)
    return pieces


class AutoFit:
    """Holds how many micro-batches each loaded batch is split into, and reacts to OOM errors."""

    def __init__(self, enabled: bool, splits: int = 1):
        self.enabled = enabled
        self.splits = splits
        self.retries = 0

    def micro_batches(self, loaded: list[Batch]) -> list[tuple[Batch, float]]:
        """Every micro-batch of one optimizer step with its weight (its share of the step's samples)."""
        total = sum(batch_size(b) for b in loaded)
        return [(piece, batch_size(piece) / total) for batch in loaded for piece in split_batch(batch, self.splits)]

    def recover(self, loaded: list[Batch], message: str) -> None:
        """Called after an OOM, outside the ``except`` block so the failed step's tensors are already
        released: free cached memory and halve the micro-batch, or raise if that is impossible."""
        micro = math.ceil(batch_size(loaded[0]) / self.splits)
        if micro <= 1:
            raise AutoFitExhausted(
                "out of memory at micro-batch 1 (train.auto_fit cannot split further); shorten "
                "data.segment_seconds, set train.activation_checkpointing: blocks, or launch with a "
                f"sharding/offload strategy (python launch/plan.py tells which fits). Last error: {message}")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.splits *= 2
        self.retries += 1
        new_micro = math.ceil(batch_size(loaded[0]) / self.splits)
        logger.warning("out of memory at micro-batch %d: retrying the step with micro-batch %d and %d "
                       "micro-batches per loaded batch (train.auto_fit)", micro, new_micro, self.splits)
