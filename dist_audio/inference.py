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
    """Model in eval mode and its run config, from any of:

    - an export directory (``launch/export.py`` output: ``model.safetensors`` + ``config.yaml``);
    - a checkpoint directory ``runs/<name>/checkpoints/step-<N>/`` written under any strategy
      (EMA weights when the run kept an EMA);
    - a run directory ``runs/<name>/`` (its newest complete checkpoint).
    """
    path = Path(path)
    weights, config = path / "model.safetensors", path / "config.yaml"
    if not (path / "trainer_state.json").is_file() and not (path / "checkpoints").is_dir():
        if not (weights.is_file() and config.is_file()):
            raise FileNotFoundError(f"{path} is not an export (model.safetensors + config.yaml), "
                                    "a checkpoint directory or a run directory")
        cfg = config_from_dict(yaml.safe_load(config.read_text()))
        state = load_file(str(weights))
    else:
        from dist_audio.train.consolidate import consolidated_weights

        state, cfg, _ = consolidated_weights(path)
    model = build_model(cfg.model)
    model.load_state_dict(state)
    return model.to(device).eval(), cfg
