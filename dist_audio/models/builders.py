"""The one place that turns a model config into a model (audiocraft's builders pattern)."""

from __future__ import annotations

from torch import nn

from dist_audio.config import SashimiConfig, TFSWAConfig


def build_sashimi(cfg: SashimiConfig) -> nn.Module:
    from dist_audio.models.heads import make_head
    from dist_audio.models.s4 import SSMOptions
    from dist_audio.models.sashimi import SaShiMi

    s4 = cfg.s4
    ssm = SSMOptions(mode=s4.mode, init=s4.init, d_state=s4.d_state, dt_min=s4.dt_min, dt_max=s4.dt_max,
                     l_max=s4.l_max, kernel_chunk=s4.kernel_chunk)
    return SaShiMi(levels=2**cfg.bits, out_features=make_head(cfg.bits, cfg.head, cfg.n_mixtures).out_features,
                   d_model=cfg.d_model, n_layers=cfg.n_layers, pool=tuple(cfg.pool), expand=cfg.expand,
                   ff=cfg.ff, glu=cfg.glu, unet=cfg.unet, dropout=cfg.dropout, ssm=ssm, ssm_lr=s4.lr)


def build_tfswa(cfg: TFSWAConfig) -> nn.Module:
    from dist_audio.models.tfswa import TFSWAUNet

    return TFSWAUNet(
        sources=len(cfg.sources), channels=cfg.channels, n_fft=cfg.n_fft, hop=cfg.hop, subbands=cfg.subbands,
        dims=cfg.dims, depths=cfg.depths, heads=cfg.heads, window=cfg.window, placement=cfg.attention,
        swin_depth=cfg.swin_depth, mlp_ratio=cfg.mlp_ratio, output=cfg.output, dropout=cfg.dropout,
    )


def build_model(cfg: SashimiConfig | TFSWAConfig) -> nn.Module:
    """Build the model named by ``cfg.name`` on the CPU in fp32."""
    if isinstance(cfg, SashimiConfig):
        return build_sashimi(cfg)
    if isinstance(cfg, TFSWAConfig):
        return build_tfswa(cfg)
    raise TypeError(f"no builder for {type(cfg).__name__}")
