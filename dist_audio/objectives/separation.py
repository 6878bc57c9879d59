"""Separation objective: the model maps a mixture to its stems; L1 on the waveform (the paper).

Batches are ``{"mixture": [b, c, n], "stems": [b, s, c, n]}`` with stems in ``model.sources`` order.
An optional multi-resolution STFT term (``model.mrstft_weight``; spectral convergence + log
magnitude at three resolutions) adds a spectral view of the error.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_audio.config import DataConfig, TFSWAConfig
from dist_audio.metrics import usdr
from dist_audio.models.precision import float32

__all__ = ["SeparationObjective", "multi_resolution_stft_loss"]

# (n_fft, hop) pairs; windows shorter than a frame of the model's STFT catch transients it smears
STFT_RESOLUTIONS = ((512, 128), (1024, 256), (2048, 512))


@float32
def multi_resolution_stft_loss(estimate: torch.Tensor, reference: torch.Tensor,
                               resolutions=STFT_RESOLUTIONS) -> torch.Tensor:
    """Spectral convergence + log-magnitude L1, averaged over resolutions: ``[b, ..., n]`` → ``[b]``."""
    b, n = estimate.shape[0], estimate.shape[-1]
    est, ref = estimate.reshape(-1, n), reference.reshape(-1, n)
    total = estimate.new_zeros(b)
    for n_fft, hop in resolutions:
        window = torch.hann_window(n_fft, device=estimate.device, dtype=estimate.dtype)
        spec = [torch.stft(x, n_fft, hop, window=window, pad_mode="constant", return_complex=True).abs()
                .reshape(b, -1) for x in (est, ref)]
        convergence = (spec[1] - spec[0]).norm(dim=1) / (spec[1].norm(dim=1) + 1e-7)
        log_mag = (torch.log(spec[0] + 1e-7) - torch.log(spec[1] + 1e-7)).abs().mean(dim=1)
        total = total + convergence + log_mag
    return total / len(resolutions)


class SeparationObjective:
    """Loss, validation metrics (loss and uSDR per stem) and previews for a separation model."""

    def __init__(self, model_cfg: TFSWAConfig, data_cfg: DataConfig):
        self.sources = list(model_cfg.sources)
        self.sample_rate = model_cfg.sample_rate
        self.mrstft_weight = model_cfg.mrstft_weight

    @float32
    def _per_sample_loss(self, estimate: torch.Tensor, stems: torch.Tensor) -> tuple[torch.Tensor, dict]:
        l1 = (estimate - stems).abs().mean(dim=(1, 2, 3))
        parts = {"l1": l1}
        loss = l1
        if self.mrstft_weight:
            parts["mrstft"] = multi_resolution_stft_loss(estimate, stems)
            loss = loss + self.mrstft_weight * parts["mrstft"]
        return loss, parts

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        estimate = model(batch["mixture"])
        loss, parts = self._per_sample_loss(estimate, batch["stems"])
        metrics = {name: value.mean().detach() for name, value in parts.items()}
        metrics["sdr"] = usdr(batch["stems"], estimate.detach()).mean()
        return loss.mean(), metrics

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Per-sample ``loss``, ``sdr/<stem>`` (uSDR, dB) and ``sdr/avg``, each ``[b]``."""
        estimate = model(batch["mixture"])
        loss, parts = self._per_sample_loss(estimate, batch["stems"])
        sdr = usdr(batch["stems"], estimate)  # [b, s]
        out = {"loss": loss, **parts}
        out.update({f"sdr/{stem}": sdr[:, i] for i, stem in enumerate(self.sources)})
        out["sdr/avg"] = sdr.mean(dim=1)
        return out

    @torch.no_grad()
    def preview(self, model: nn.Module, batch: dict, seconds: float) -> dict[str, torch.Tensor]:
        """The first example's mixture, separated stems and true stems (``target/<stem>``), ``name -> [c, n]``
        in [-1, 1]."""
        length = max(1, round(seconds * self.sample_rate))
        mixture = batch["mixture"][:1, :, :length]
        estimate = model(mixture)[0].clamp(-1, 1)
        targets = batch["stems"][0, :, :, :length]
        return {"mixture": mixture[0].clamp(-1, 1), **{stem: estimate[i] for i, stem in enumerate(self.sources)},
                **{f"target/{stem}": targets[i] for i, stem in enumerate(self.sources)}}
