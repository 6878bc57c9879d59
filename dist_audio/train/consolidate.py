"""Full fp32 weights from a training checkpoint, whatever strategy and world size wrote it, on one process.

A checkpoint directory (``runs/<name>/checkpoints/step-<N>/``, see ``checkpoint.py``) holds ``config.yaml``
and ``state/``, the portable training state (``portable_state``): one torch.distributed.checkpoint
directory whose ``model/<name>`` (and, with an EMA, ``ema/<name>``) entries are read here into full
tensors without a process group, with the metadata unpickled safely.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from dist_audio.config import RunConfig, config_from_dict
from dist_audio.train.checkpoint import STATE_DIR, STATE_FILE, latest_checkpoint
from dist_audio.train.portable_state import read_full_state

__all__ = ["consolidated_weights", "resolve_checkpoint"]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or a run directory's newest complete checkpoint."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    if (path / "checkpoints").is_dir():
        newest = latest_checkpoint(path)
        if newest is None:
            raise FileNotFoundError(f"run directory {path} has no complete checkpoint yet")
        return newest
    raise FileNotFoundError(f"{path} is neither a checkpoint (no {STATE_FILE}) nor a run directory (no checkpoints/)")


def consolidated_weights(checkpoint: str | Path, *, prefer_ema: bool = True
                         ) -> tuple[dict[str, torch.Tensor], RunConfig, str]:
    """``(state_dict, config, source)``: fp32 CPU weights keyed like the plain model's state dict, the
    run config saved with the checkpoint, and which weights were taken (``ema`` or ``trained``)."""
    ckpt = resolve_checkpoint(checkpoint)
    cfg = config_from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()))
    state = ckpt / STATE_DIR
    if not state.is_dir():
        raise FileNotFoundError(f"{ckpt} holds no {STATE_DIR}/ directory (written by an older version?)")
    weights = read_full_state(state, "ema/") if prefer_ema else {}
    source = "ema" if weights else "trained"
    weights = weights or read_full_state(state, "model/")
    weights |= read_full_state(state, "buffer/")
    return {k: v.float().contiguous() for k, v in weights.items()}, cfg, source
