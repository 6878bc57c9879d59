"""Full fp32 weights from a training checkpoint, whatever strategy wrote it, on one process.

A checkpoint directory (``runs/<name>/checkpoints/step-<N>/``, see ``checkpoint.py``) holds
``config.yaml`` and the model in the layout of the strategy that wrote it:

- DDP / single device: ``model.safetensors`` (Accelerate's ``save_state``);
- DeepSpeed ZeRO-2/3: ``pytorch_model/`` engine shards, merged with DeepSpeed's zero-to-fp32 utilities;
- FSDP2: ``fsdp2_state/`` (hand-applied on CPU) or ``pytorch_model_fsdp_0/`` (Accelerate, sharded state
  dict), both ``torch.distributed.checkpoint`` directories read here without a process group;
- with an EMA: ``ema/rank0.pt`` holds the consolidated EMA weights, preferred when present.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import yaml

from dist_audio.config import RunConfig, config_from_dict
from dist_audio.train.checkpoint import STATE_FILE, latest_checkpoint
from dist_audio.train.parallelize import FSDP_STATE_DIR, plain_name

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
    run config saved with the checkpoint, and which weights were taken (``ema`` or the strategy's name)."""
    ckpt = resolve_checkpoint(checkpoint)
    cfg = config_from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()))
    ema_file = ckpt / "ema" / "rank0.pt"
    if prefer_ema and ema_file.is_file():
        weights, source = torch.load(ema_file, map_location="cpu", weights_only=True)["weights"], "ema"
    elif (ckpt / "model.safetensors").is_file():
        from safetensors.torch import load_file

        weights, source = load_file(str(ckpt / "model.safetensors")), "ddp"
    elif (ckpt / "pytorch_model").is_dir():
        weights, source = _deepspeed_weights(ckpt), "deepspeed"
    elif (ckpt / FSDP_STATE_DIR).is_dir() or (ckpt / "pytorch_model_fsdp_0").is_dir():
        weights, source = _fsdp_weights(ckpt, cfg), "fsdp2"
    else:
        raise FileNotFoundError(f"{ckpt} holds no model weights in a layout this version knows")
    return {plain_name(k): v.detach().float().contiguous() for k, v in weights.items()}, cfg, source


def _deepspeed_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="pytorch_model")


def _fsdp_weights(ckpt: Path, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """Read the model entries of a DCP checkpoint into a freshly built model's state dict."""
    import torch.distributed.checkpoint as dcp

    from dist_audio.models import build_model

    state = {"model": build_model(cfg.model).state_dict()}
    directory = ckpt / FSDP_STATE_DIR if (ckpt / FSDP_STATE_DIR).is_dir() else ckpt / "pytorch_model_fsdp_0"
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    return state["model"]

