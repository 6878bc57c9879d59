"""Output heads of the autoregressive model: what its per-step outputs mean as a distribution over bins.

- ``CategoricalHead``: 2^bits logits, softmax over the quantization levels.
- ``DMLHead``: a discretized mixture of logistics (PixelCNN++, Salimans et al. 2017) with
  ``n_mixtures`` components (3·n_mixtures outputs: mixture logits, means, log scales) over the bins
  placed evenly on [-1, 1]; the first and last bins take the tails.

The training path (``nll``) never builds more than one [b, l, 2^bits] float tensor: the categorical
log-normaliser is computed in row chunks by a custom autograd function whose backward writes the
logits' gradient in place, and the DML likelihood is evaluated only at the target bin.
Heads hold no parameters (the model's output linear produces their inputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CategoricalHead", "DMLHead", "make_head", "nats_to_bits", "sample_from_log_probs"]

_ROWS_PER_CHUNK = 4096  # rows of 2^bits logits processed at once by the categorical NLL
_MIN_LOG_SCALE = -7.0  # PixelCNN++ floor on the logistic log scale


class _CategoricalNLL(torch.autograd.Function):
    """−log softmax(logits)[target] per row, with O(chunk · levels) temporaries."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor) -> Tensor:
        flat = logits.reshape(-1, logits.shape[-1])
        lse = torch.empty(flat.shape[0], dtype=torch.float32 if logits.dtype != torch.float64 else logits.dtype,
                          device=logits.device)
        for start in range(0, flat.shape[0], _ROWS_PER_CHUNK):
            lse[start:start + _ROWS_PER_CHUNK] = torch.logsumexp(
                flat[start:start + _ROWS_PER_CHUNK].to(lse.dtype), dim=-1)
        lse = lse.view(logits.shape[:-1])
        ctx.save_for_backward(logits, target, lse)
        return lse - logits.gather(-1, target[..., None])[..., 0].to(lse.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, target, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        flat, out = logits.reshape(-1, logits.shape[-1]), grad_logits.view(-1, logits.shape[-1])
        lse_flat, grad_flat = lse.reshape(-1, 1), grad.reshape(-1, 1)
        for start in range(0, flat.shape[0], _ROWS_PER_CHUNK):
            rows = slice(start, start + _ROWS_PER_CHUNK)
            out[rows] = torch.exp(flat[rows].to(lse.dtype) - lse_flat[rows]) * grad_flat[rows]
        grad_logits.scatter_add_(-1, target[..., None], -grad[..., None].to(logits.dtype))
        return grad_logits, None


class CategoricalHead:
    """Softmax over ``2^bits`` levels."""

    def __init__(self, bits: int):
        self.levels = 2**bits
        self.out_features = self.levels

    def nll(self, out: Tensor, target: Tensor) -> Tensor:
        """Negative log-likelihood in nats, [...] from out [..., levels] and Long target [...]."""
        return _CategoricalNLL.apply(out, target)

    def log_prob_bins(self, out: Tensor) -> Tensor:
        return torch.log_softmax(out.float() if out.dtype != torch.float64 else out, dim=-1)


class DMLHead:
    """Discretized mixture of ``n_mixtures`` logistics over ``2^bits`` bins evenly spaced on [-1, 1]."""

    def __init__(self, bits: int, n_mixtures: int):
        self.levels = 2**bits
        self.n_mixtures = n_mixtures
        self.out_features = 3 * n_mixtures

    def _split(self, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = out.float() if out.dtype != torch.float64 else out
        logits, means, log_scales = out.split(self.n_mixtures, dim=-1)
        return torch.log_softmax(logits, -1), means, log_scales.clamp(min=_MIN_LOG_SCALE)

    def _component_log_probs(self, bins: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
        """log P(bin | component), broadcast over ``bins`` (Long) and the component parameters.

        P = σ(a) − σ(b) with a, b the scaled bin edges, computed as log σ(a) + log σ(−b) + log(1 − e^{b−a}),
        which is exact and stable; the edge bins drop the missing edge's terms, so bins sum to 1.
        """
        half_width = 1.0 / (self.levels - 1)
        centre = 2.0 * bins.to(means.dtype) / (self.levels - 1) - 1.0
        inv_scale = torch.exp(-log_scales)
        upper = inv_scale * (centre - means + half_width)
        lower = inv_scale * (centre - means - half_width)
        first, last = bins == 0, bins == self.levels - 1
        log_upper = torch.where(last, 0.0, F.logsigmoid(upper))
        log_lower = torch.where(first, 0.0, F.logsigmoid(-lower))
        width = torch.where(first | last, 0.0, torch.log(-torch.expm1(-2.0 * half_width * inv_scale)))
        return log_upper + log_lower + width

    def nll(self, out: Tensor, target: Tensor) -> Tensor:
        """Negative log-likelihood in nats, [...] from out [..., 3·n_mixtures] and Long target [...]."""
        log_weights, means, log_scales = self._split(out)
        log_p = self._component_log_probs(target[..., None], means, log_scales)
        return -torch.logsumexp(log_weights + log_p, dim=-1)

    def log_prob_bins(self, out: Tensor) -> Tensor:
        """log P(bin) for every bin, [..., levels]; accumulated one component at a time."""
        log_weights, means, log_scales = self._split(out)
        bins = torch.arange(self.levels, device=out.device)
        total = None
        for k in range(self.n_mixtures):
            term = log_weights[..., k, None] + self._component_log_probs(
                bins, means[..., k, None], log_scales[..., k, None])
            total = term if total is None else torch.logaddexp(total, term)
        return total


def make_head(bits: int, head: str, n_mixtures: int = 6) -> CategoricalHead | DMLHead:
    if head == "categorical":
        return CategoricalHead(bits)
    if head == "dml":
        return DMLHead(bits, n_mixtures)
    raise ValueError(f"unknown head {head!r} (categorical | dml)")


def sample_from_log_probs(log_probs: Tensor, *, temperature: float = 1.0, top_p: float = 1.0,
                          generator: torch.Generator | None = None) -> Tensor:
    """Draw Long[b] from log_probs [b, levels]; temperature 0 is greedy, top_p < 1 keeps the nucleus."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if temperature == 0:
        return log_probs.argmax(-1)
    probs = torch.softmax(log_probs / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the top token is always kept
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        return order.gather(-1, _inverse_cdf_sample(sorted_probs, generator)[..., None])[..., 0]
    return _inverse_cdf_sample(probs, generator)


def _inverse_cdf_sample(weights: Tensor, generator: torch.Generator | None) -> Tensor:
    """One index per row with probability ∝ weights [b, n] (≥ 0): the first bin whose cumulative weight
    exceeds a uniform draw; ~8× cheaper than ``torch.multinomial`` per generated sample on CPU."""
    cdf = weights.cumsum(-1)
    draw = torch.rand((*cdf.shape[:-1], 1), generator=generator, dtype=cdf.dtype, device=cdf.device) * cdf[..., -1:]
    return torch.searchsorted(cdf, draw, right=True)[..., 0].clamp_(max=weights.shape[-1] - 1)


def nats_to_bits(nats: Tensor) -> Tensor:
    """Nats to bits."""
    return nats / math.log(2)
