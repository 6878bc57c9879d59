"""TFSWA-ResUNet: a residual U-Net on the magnitude spectrogram with time-frequency attention.

After Yao et al., "TFSWA-ResUNet: music source separation with time–frequency sequence and shifted
window attention-based ResUNet", EURASIP J. Adv. Signal Process. 2025:39.

Pipeline (``forward``): STFT of each channel → magnitude, split into frequency sub-bands stacked as
channels → residual U-Net (encoder stages of residual conv modules with 2×2 downsampling, decoder
stages with ×2 upsampling and concatenated skips) → one mask (or magnitude) per source and channel →
applied to the mixture STFT, mixture phase → iSTFT.

TFSWA modules (TSA, FSA, then Swin window attention alternating regular and shifted windows) sit in
the bottleneck (the paper, ``placement="bottleneck"``) or after the residual modules of every encoder
level (``"every_stage"``, the layout of the project this one replaces; decoder levels stay
convolutional). All attention is ``tf_attention`` (fused SDPA), so the activation memory grows linearly
with frames × bins.

Precision (``dist_audio.models.precision``): the STFT / iSTFT, magnitude, input scaling, masking with the
mixture phase and the loss are float32 islands; the U-Net between them (convs, norms, attention, feed-forwards)
computes in the training precision. No parameter needs float32 (``fp32_classes`` is empty).

Axis letters: ``b`` batch, ``s`` sources, ``c`` audio channels, ``n`` samples, ``f`` frequency bins,
``t`` frames, ``d`` feature channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dist_audio.models.precision import as_float32, float32, like_parameter
from dist_audio.models.tf_attention import FrequencyAttention, TimeAttention, WindowAttention

__all__ = ["AttentionLayer", "ResidualBlock", "TFSWAModule", "TFSWAUNet"]


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of ``[b, d, t, f]`` at every time-frequency point (length-independent)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class ResidualBlock(nn.Module):
    """Pre-activation residual conv module: x + conv(act(norm(conv(act(norm(x))))))."""

    def __init__(self, dim: int, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(
            ChannelNorm(dim), nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1),
            ChannelNorm(dim), nn.ReLU(), nn.Dropout(dropout), nn.Conv2d(dim, dim, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class AttentionLayer(nn.Module):
    """Pre-norm residual attention on a channels-last map ``[b, t, f, d]``, optionally with a feed-forward."""

    def __init__(self, attention: nn.Module, dim: int, mlp_ratio: int = 0, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = attention
        self.mlp = None
        if mlp_ratio:
            self.mlp = nn.Sequential(
                nn.LayerNorm(dim), nn.Linear(dim, mlp_ratio * dim), nn.ReLU(), nn.Dropout(dropout),
                nn.Linear(mlp_ratio * dim, dim),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm(x))
        return x if self.mlp is None else x + self.mlp(x)


class TFSWAModule(nn.Module):
    """TSA (global over time), FSA (global over frequency), then Swin layers for local context.

    Swin layers alternate regular and shifted windows, each followed by a feed-forward as in Swin.
    Takes and returns ``[b, d, t, f]``; works channels-last inside.
    """

    def __init__(self, dim: int, *, heads: int, window: Sequence[int], swin_depth: int, mlp_ratio: int,
                 dropout: float = 0.0):
        super().__init__()
        layers = [AttentionLayer(TimeAttention(dim, heads), dim), AttentionLayer(FrequencyAttention(dim, heads), dim)]
        layers += [
            AttentionLayer(WindowAttention(dim, heads, tuple(window), shifted=i % 2 == 1), dim, mlp_ratio, dropout)
            for i in range(swin_depth)
        ]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        for layer in self.layers:
            x = layer(x)
        return x.permute(0, 3, 1, 2)


class SkipMerge(nn.Module):
    """A 1×1 conv over the concatenation [upsampled, skip], computed as two convs on the parts so the
    concatenation is never stored for backward (the skip is already kept by the downsampling conv)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(2 * dim, dim, 1)
        self.dim = dim

    def forward(self, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        weight = self.conv.weight
        return F.conv2d(up, weight[:, : self.dim]) + F.conv2d(skip, weight[:, self.dim :], self.conv.bias)


class Stage(nn.Module):
    """``depth`` residual conv modules, then a TFSWA module when this stage carries attention."""

    def __init__(self, dim: int, depth: int, attention: TFSWAModule | None, dropout: float):
        super().__init__()
        self.blocks = nn.Sequential(*(ResidualBlock(dim, dropout) for _ in range(depth)))
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        return x if self.attention is None else self.attention(x)


class TFSWAUNet(nn.Module):
    """Separates ``mix [b, c, n]`` into ``[b, s, c, n]`` through masks on the mixture STFT."""

    block_classes: tuple[type[nn.Module], ...] = (ResidualBlock, AttentionLayer)
    fp32_classes: tuple[type[nn.Module], ...] = ()

    def __init__(
        self,
        *,
        sources: int = 4,
        channels: int = 2,
        n_fft: int = 2048,  # paper: 2048 / 441 at 44.1 kHz
        hop: int = 441,
        subbands: int = 1,  # frequency sub-bands stacked as input channels
        dims: Sequence[int] = (32, 64, 128, 256),  # width per stage; the last stage is the bottleneck
        depths: Sequence[int] = (2, 2, 2, 2),  # residual modules per stage
        heads: int = 4,
        window: Sequence[int] = (8, 8),  # Swin window (frames, bins)
        placement: str = "bottleneck",  # "bottleneck" (paper) | "every_stage"
        swin_depth: int = 2,
        mlp_ratio: int = 2,
        output: str = "mask",  # "mask": sigmoid masks | "magnitude": non-negative magnitudes
        dropout: float = 0.0,
    ):
        super().__init__()
        if placement not in ("bottleneck", "every_stage"):
            raise ValueError(f"placement must be 'bottleneck' or 'every_stage', got {placement!r}")
        if output not in ("mask", "magnitude"):
            raise ValueError(f"output must be 'mask' or 'magnitude', got {output!r}")
        self.sources, self.channels, self.subbands = sources, channels, subbands
        self.n_fft, self.hop, self.output = n_fft, hop, output
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        # every U-Net level halves both axes: pad frames and (per-band) bins to a multiple of this
        self.multiple = 2 ** (len(dims) - 1)

        def tfswa(dim: int, here: bool) -> TFSWAModule | None:
            if not here:
                return None
            return TFSWAModule(dim, heads=heads, window=window, swin_depth=swin_depth, mlp_ratio=mlp_ratio,
                               dropout=dropout)

        last = len(dims) - 1
        every = placement == "every_stage"
        in_dim = channels * subbands
        self.stem = nn.Conv2d(in_dim, dims[0], 3, padding=1)
        self.encoder = nn.ModuleList(
            Stage(dims[i], depths[i], tfswa(dims[i], every or i == last), dropout) for i in range(len(dims))
        )
        self.down = nn.ModuleList(nn.Conv2d(dims[i], dims[i + 1], 2, stride=2) for i in range(last))
        self.up = nn.ModuleList(nn.ConvTranspose2d(dims[i + 1], dims[i], 2, stride=2) for i in range(last))
        self.merge = nn.ModuleList(SkipMerge(dims[i]) for i in range(last))
        self.decoder = nn.ModuleList(Stage(dims[i], depths[i], None, dropout) for i in range(last))
        self.head = nn.Conv2d(dims[0], sources * in_dim, 1)

    # -- spectrogram plumbing ---------------------------------------------------------------------

    @float32
    def stft(self, audio: torch.Tensor) -> torch.Tensor:
        """``[..., n]`` → complex ``[..., f, t]`` (centred frames, Hann window)."""
        lead = audio.shape[:-1]
        spec = torch.stft(audio.reshape(-1, audio.shape[-1]), self.n_fft, self.hop, window=as_float32(self.window),
                          center=True, pad_mode="constant", return_complex=True)
        return spec.reshape(*lead, *spec.shape[-2:])

    @float32
    def istft(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        """Complex ``[..., f, t]`` → ``[..., length]``; the exact inverse of ``stft``."""
        lead = spec.shape[:-2]
        audio = torch.istft(spec.reshape(-1, *spec.shape[-2:]), self.n_fft, self.hop, window=as_float32(self.window),
                            center=True, length=length)
        return audio.reshape(*lead, length)

    # -- model ------------------------------------------------------------------------------------

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """mix ``[b, c, n]`` → sources ``[b, s, c, n]``."""
        if mix.dim() != 3 or mix.shape[1] != self.channels:
            raise ValueError(f"expected mixture [batch, {self.channels}, samples], got {tuple(mix.shape)}")
        spec = self.stft(mix)  # [b, c, f, t], complex64
        masks = self.estimate(spec.abs())  # [b, s, c, f, t], float32
        return self.istft(spec.unsqueeze(1) * masks, mix.shape[-1])

    def estimate(self, mag: torch.Tensor) -> torch.Tensor:
        """Mixture magnitude ``[b, c, f, t]`` → float32 masks ``[b, s, c, f, t]`` for the mixture STFT."""
        b, c, f, t = mag.shape
        k, m = self.subbands, self.multiple
        # scale-free input: the network sees the magnitude relative to its mean
        scale = mag.mean(dim=(1, 2, 3), keepdim=True) + 1e-8
        band = -(-f // (k * m)) * m  # bins per sub-band, a multiple of m
        frames = -(-t // m) * m
        x = F.pad(mag / scale, (0, frames - t, 0, band * k - f))  # [b, c, k·band, frames]
        x = x.reshape(b, c * k, band, frames).transpose(2, 3)  # [b, c·k, t, band]

        # channels-last memory all the way: norms, attention and convs then need no layout copies
        x = self.stem(like_parameter(x, self.stem.weight).contiguous(memory_format=torch.channels_last))
        skips = []
        for i, stage in enumerate(self.encoder):
            x = stage(x)
            if i < len(self.down):
                skips.append(x)
                x = self.down[i](x)
        for i in reversed(range(len(self.decoder))):
            x = self.merge[i](self.up[i](x), skips[i])
            x = self.decoder[i](x)
        x = as_float32(self.head(x))  # [b, s·c·k, t, band]

        x = x.transpose(2, 3).reshape(b, self.sources, c, k * band, frames)[..., :f, :t]
        if self.output == "mask":
            return torch.sigmoid(x)
        # direct magnitudes, turned into the equivalent mask on the mixture
        return F.relu(x) * scale.unsqueeze(1) / (mag.unsqueeze(1) + 1e-8)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on conv and linear weights only, none on norms and biases."""
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
