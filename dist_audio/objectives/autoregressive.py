"""Autoregressive next-sample objective for SaShiMi: likelihood of quantized audio, in bits per sample.

Batches are ``{"x": Long[b, l], "y": Long[b, l]}`` with x = y shifted right by one (the first input
is the zero level). Previews are generated in recurrent mode, one sample at a time, as in inference.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn

from dist_audio.config import DataConfig, SashimiConfig
from dist_audio.data.quantize import dequantize, zero_level
from dist_audio.models.heads import CategoricalHead, DMLHead, make_head, nats_to_bits, sample_from_log_probs
from dist_audio.models.sashimi import SashimiState

__all__ = ["AutoregressiveObjective", "PeriodSampler", "generate"]


@torch.inference_mode()
def generate(model: nn.Module, head: CategoricalHead | DMLHead, *, num: int, steps: int, first_token: int,
             temperature: float = 1.0, top_p: float = 1.0, prefix: Tensor | None = None,
             generator: torch.Generator | None = None, state: SashimiState | None = None) -> tuple[Tensor, Tensor]:
    """Sample ``num`` sequences of ``steps`` new tokens in recurrent mode, after an optional prefix.

    The run starts from ``state`` when given (e.g. ``model.default_state(num, compiled=True)``, kept for
    several runs; it is reset first), else from a fresh eager ``model.default_state(num)``.

    Returns the tokens Long[num, prefix + steps] (prefix included) and the log-likelihood in nats of
    the generated tokens under the model itself (temperature 1, no nucleus cut), Float[num].
    """
    device = next(model.parameters()).device
    prefix = torch.empty(num, 0, dtype=torch.long) if prefix is None else prefix
    if prefix.shape[0] != num:
        raise ValueError(f"prefix holds {prefix.shape[0]} sequences, expected {num}")
    prefix = prefix.to(device)
    state = model.default_state(num) if state is None else state.reset()
    token = torch.full((num,), first_token, dtype=torch.long, device=device)
    tokens, log_likelihood = [], torch.zeros(num, dtype=torch.float64, device=device)
    for t in range(prefix.shape[1] + steps):
        out, state = model.step(token, state)
        if t < prefix.shape[1]:
            token = prefix[:, t]
        else:
            log_probs = head.log_prob_bins(out)
            token = sample_from_log_probs(log_probs, temperature=temperature, top_p=top_p, generator=generator)
            log_likelihood += log_probs.gather(-1, token[:, None])[:, 0]
        tokens.append(token)
    return torch.stack(tokens, dim=1), log_likelihood


class PeriodSampler:
    """Unconditional sampling of ``batch`` sequences, one period (``prod(model.pool)`` steps, after which
    every stage's phase repeats) per call, optionally captured once in a CUDA graph and replayed.

    A recurrent step at small batch is hundreds of tiny kernels; replaying them as one graph removes the
    launch and Python cost. A period is what gets captured because the stages run depend on the step's
    phase; the state keeps its tensors in place, so every replay continues the last one. Eagerly (on
    any device) it draws exactly what ``generate`` draws from the same generator; in a graph the random
    draws come from the default CUDA generator (graph-safe), so they differ from eager ones.
    """

    def __init__(self, model: nn.Module, head: CategoricalHead | DMLHead, batch: int, *, first_token: int,
                 temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 cuda_graph: bool = False):
        self.model, self.head, self.first_token = model, head, first_token
        self.temperature, self.top_p, self.generator = temperature, top_p, generator
        self.period = math.prod(model.pool)
        device = next(model.parameters()).device
        self.state = model.default_state(batch)
        with torch.inference_mode():
            self.token = torch.full((batch,), first_token, dtype=torch.long, device=device)
        self.graph = None
        self.capture_seconds = 0.0
        if cuda_graph:
            if device.type != "cuda" or generator is not None:
                raise ValueError("a CUDA graph needs a model on a CUDA device and the default generator")
            self._capture()

    @torch.inference_mode()
    def _period(self) -> tuple[Tensor, Tensor]:
        tokens, log_likelihood = [], torch.zeros(self.token.shape[0], dtype=torch.float64, device=self.token.device)
        token = self.token
        for _ in range(self.period):
            out, _ = self.model.step(token, self.state)
            log_probs = self.head.log_prob_bins(out)
            token = sample_from_log_probs(log_probs, temperature=self.temperature, top_p=self.top_p,
                                          generator=self.generator)
            log_likelihood += log_probs.gather(-1, token[:, None])[:, 0]
            tokens.append(token)
        self.token.copy_(token)
        return torch.stack(tokens, dim=1), log_likelihood

    def _capture(self) -> None:
        start = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (library handles, workspaces)
            for _ in range(2):
                self._period()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.graph_output = self._period()
        self.reset()
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start

    @torch.inference_mode()
    def reset(self) -> None:
        """Back to the start: zero state, the first token."""
        self.state.reset()
        self.token.fill_(self.first_token)

    @torch.inference_mode()
    def run(self, periods: int) -> tuple[Tensor, Tensor]:
        """Reset, then sample ``periods`` periods: Long[batch, periods × period] tokens and their
        log-likelihood in nats under the model, Float64[batch]."""
        self.reset()
        tokens, log_likelihood = [], 0.0
        for _ in range(periods):
            if self.graph is None:
                chunk, ll = self._period()
            else:
                self.graph.replay()
                chunk, ll = (t.clone() for t in self.graph_output)
                self.state.t += self.period  # the Python side of the state, which a replay does not run
            tokens.append(chunk)
            log_likelihood = log_likelihood + ll
        return torch.cat(tokens, dim=1), log_likelihood


class AutoregressiveObjective:
    """Negative log-likelihood of the next quantized sample under the model's head."""

    def __init__(self, model_cfg: SashimiConfig, data_cfg: DataConfig):
        self.head = make_head(model_cfg.bits, model_cfg.head, model_cfg.n_mixtures)
        self.bits = model_cfg.bits
        self.quantization = data_cfg.quantization
        self.interleave_stereo = data_cfg.interleave_stereo
        self.sample_rate = model_cfg.sample_rate

    def _nll(self, model: nn.Module, batch: dict) -> Tensor:
        return self.head.nll(model(batch["x"]), batch["y"])

    def loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        loss = self._nll(model, batch).mean()
        return loss, {"bits_per_sample": nats_to_bits(loss.detach())}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        nll = self._nll(model, batch).mean(dim=-1)
        return {"loss": nll, "bits_per_sample": nats_to_bits(nll)}

    def preview(self, model: nn.Module, batch: dict, seconds: float) -> dict[str, Tensor]:
        """One unconditional sample of ``seconds`` decoded to [C, T] audio (``generated``), and the batch's
        first example as ``real`` (at most as long) to compare it with."""
        channels = 2 if self.interleave_stereo else 1
        steps = int(seconds * self.sample_rate) * channels
        was_training = model.training
        model.eval()
        try:
            first_token = zero_level(self.bits, self.quantization)
            tokens, _ = generate(model, self.head, num=1, steps=steps, first_token=first_token)
        finally:
            model.train(was_training)
        audio = dequantize(tokens.cpu(), self.bits, self.quantization)
        real = dequantize(batch["y"][0, :steps].cpu(), self.bits, self.quantization)
        return {"generated": deinterleave(audio[0], channels), "real": deinterleave(real, channels)}


def deinterleave(wave: Tensor, channels: int) -> Tensor:
    """[T·C] interleaved samples → [C, T]."""
    return wave[: wave.shape[-1] // channels * channels].reshape(-1, channels).T.contiguous()
