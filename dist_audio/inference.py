"""Load a trained model on one device from an export, a checkpoint or a run directory."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from dist_audio.config import RunConfig, config_from_dict
from dist_audio.models import build_model


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, RunConfig]:
    """Model in eval mode and its run config, from an export directory (``launch/export.py`` output:
    ``model.safetensors`` + ``config.yaml``)."""
    path = Path(path)
    weights, config = path / "model.safetensors", path / "config.yaml"
    if not (weights.is_file() and config.is_file()):
        raise FileNotFoundError(f"{path} holds no model.safetensors + config.yaml")
    cfg = config_from_dict(yaml.safe_load(config.read_text()))
    model = build_model(cfg.model)
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval(), cfg
