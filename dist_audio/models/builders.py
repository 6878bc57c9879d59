"""The one place that turns a model config into a model (audiocraft's builders pattern)."""

from __future__ import annotations

from torch import nn

from dist_audio.config import SashimiConfig, TFSWAConfig


def build_sashimi(cfg: SashimiConfig) -> nn.Module:
    from dist_audio.models.sashimi import SaShiMi

    raise NotImplementedError("SaShiMi builder: filled in by the SaShiMi work")  # stub: replaced


def build_tfswa(cfg: TFSWAConfig) -> nn.Module:
    from dist_audio.models.tfswa import TFSWAUNet

    raise NotImplementedError("TF-SWA builder: filled in by the TF-SWA work")  # stub: replaced


def build_model(cfg: SashimiConfig | TFSWAConfig) -> nn.Module:
    """Build the model named by ``cfg.name`` on the CPU in fp32."""
    if isinstance(cfg, SashimiConfig):
        return build_sashimi(cfg)
    if isinstance(cfg, TFSWAConfig):
        return build_tfswa(cfg)
    raise TypeError(f"no builder for {type(cfg).__name__}")
