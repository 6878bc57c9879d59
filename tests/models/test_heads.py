"""Output heads: exact likelihoods, faithful sampling, and no extra [b, l, 2^bits] tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare
from torch.utils._python_dispatch import TorchDispatchMode

from dist_audio.config import DataConfig, SashimiConfig
from dist_audio.models.heads import CategoricalHead, DMLHead, sample_from_log_probs
from dist_audio.objectives import build_objective


def test_categorical_nll_is_cross_entropy_with_its_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 5000, 256, dtype=torch.float64, requires_grad=True)  # > one row chunk
    target = torch.randint(0, 256, (3, 5000))
    nll = CategoricalHead(8).nll(logits, target)
    expected = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    torch.testing.assert_close(nll, expected)
    weights = torch.rand(3, 5000, dtype=torch.float64)
    (grad,) = torch.autograd.grad((nll * weights).sum(), logits)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    torch.testing.assert_close(grad, expected_grad)


class _ModelOutput(torch.nn.Module):
    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = torch.nn.Parameter(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out


def test_bits_per_sample_is_cross_entropy_over_ln2():
    torch.manual_seed(0)
    cfg = SashimiConfig(bits=8)
    objective = build_objective(cfg, DataConfig(shards="unused", bits=8))
    logits = torch.randn(2, 100, 256)
    y = torch.randint(0, 256, (2, 100))
    batch = {"x": y, "y": y}
    loss, metrics = objective.loss(_ModelOutput(logits), batch)
    ce = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
    torch.testing.assert_close(loss, ce)
    torch.testing.assert_close(metrics["bits_per_sample"], ce / math.log(2))
    per_sample = objective.evaluate(_ModelOutput(logits), batch)
    torch.testing.assert_close(per_sample["bits_per_sample"], per_sample["loss"] / math.log(2))
    torch.testing.assert_close(per_sample["loss"].mean(), ce)


def _dml_output(shape: tuple[int, ...], mixtures: int, dtype=torch.float64) -> torch.Tensor:
    torch.manual_seed(1)
    logits = torch.randn(*shape, mixtures, dtype=dtype)
    means = torch.empty(*shape, mixtures, dtype=dtype).uniform_(-1.2, 1.2)
    log_scales = torch.empty(*shape, mixtures, dtype=dtype).uniform_(-8, 0)  # includes the clamp region
    return torch.cat([logits, means, log_scales], dim=-1)


@pytest.mark.parametrize("bits", [2, 8, 12])
def test_dml_bins_sum_to_one_and_match_the_nll(bits):
    head = DMLHead(bits, n_mixtures=6)
    out = _dml_output((3, 4), 6)
    log_probs = head.log_prob_bins(out)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3, 4, dtype=torch.float64), rtol=0, atol=1e-10)
    target = torch.randint(0, 2**bits, (3, 4))
    torch.testing.assert_close(head.nll(out, target), -log_probs.gather(-1, target[..., None])[..., 0])


def test_dml_nll_has_finite_gradients_at_extreme_parameters():
    head = DMLHead(8, n_mixtures=3)
    out = _dml_output((2, 50), 3, dtype=torch.float32) * 10
    out.requires_grad_(True)
    head.nll(out, torch.randint(0, 256, (2, 50))).sum().backward()
    assert torch.isfinite(out.grad).all()


@pytest.mark.parametrize("head", [DMLHead(4, n_mixtures=3), CategoricalHead(4)])
def test_sampling_follows_the_distribution(head):
    """Chi-square goodness of fit of 20 000 draws on a fixed seed."""
    torch.manual_seed(0)
    out = torch.tensor([1.0, 0.0, -0.5, -0.6, 0.1, 0.7, -1.2, -1.5, -1.3]) if isinstance(head, DMLHead) \
        else torch.randn(16)
    log_probs = head.log_prob_bins(out.double())
    draws = sample_from_log_probs(log_probs.expand(20000, -1), generator=torch.Generator().manual_seed(0))
    observed = torch.bincount(draws, minlength=16).double()
    expected = log_probs.exp() * 20000
    assert expected.min() > 5  # chi-square needs populated bins
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


def test_temperature_zero_is_greedy_and_top_p_keeps_the_nucleus():
    log_probs = torch.log(torch.tensor([[0.1, 0.5, 0.3, 0.1]]))
    assert sample_from_log_probs(log_probs, temperature=0).item() == 1
    draws = sample_from_log_probs(log_probs.expand(2000, -1), top_p=0.75, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 2}
    with pytest.raises(ValueError, match="top_p"):
        sample_from_log_probs(log_probs, top_p=0.0)


class _FullSizeAllocations(TorchDispatchMode):
    """Counts distinct new storages with at least ``numel`` elements created by any op."""

    def __init__(self, numel: int, known: list[torch.Tensor]):
        super().__init__()
        self.numel = numel
        self.seen = {t.untyped_storage().data_ptr() for t in known}
        self.new = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() >= self.numel:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.seen:
                    self.seen.add(ptr)
                    self.new += 1
        return out


@pytest.mark.parametrize("head", [CategoricalHead(8), DMLHead(8, n_mixtures=6)])
def test_training_loss_builds_at_most_one_full_size_tensor(head):
    """Forward and backward of the loss: the only [b, l, 2^bits] float tensor allowed is the logits' gradient."""
    b, l = 2, 20000
    out = torch.randn(b, l, head.out_features, requires_grad=True)
    target = torch.randint(0, 256, (b, l))
    with _FullSizeAllocations(b * l * 256, known=[out]) as mode:
        head.nll(out, target).mean().backward()
    assert mode.new <= (1 if isinstance(head, CategoricalHead) else 0)
