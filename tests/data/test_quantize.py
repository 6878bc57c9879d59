"""Quantization: levels, the zero level, round-trip error bounds for mu-law and linear, the lookup table."""

import math

import numpy as np
import pytest
import torch

from dist_audio.data.quantize import dequantize, pcm16_table, quantize, zero_level


@pytest.mark.parametrize("kind", ["mu-law", "linear"])
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_levels_cover_the_grid_and_silence_is_the_zero_level(kind, bits):
    x = torch.linspace(-1, 1, 200_001)
    q = quantize(x, bits, kind)
    assert q.dtype == torch.long
    assert q.min() == 0 and q.max() == 2**bits - 1
    assert torch.all(q[1:] >= q[:-1]), "quantization must be monotonic"
    assert quantize(torch.zeros(3), bits, kind).tolist() == [zero_level(bits, kind)] * 3
    assert zero_level(bits, kind) == 2 ** (bits - 1)


@pytest.mark.parametrize("bits", [4, 8, 12])
def test_linear_round_trip_error_is_within_one_level(bits):
    x = torch.rand(100_000) * 2 - 1
    error = (dequantize(quantize(x, bits, "linear"), bits, "linear") - x).abs().max().item()
    assert error <= 2 / (2**bits - 1) + 1e-6


@pytest.mark.parametrize("bits", [4, 8, 12])
def test_mu_law_round_trip_error_is_within_one_level_in_the_companded_domain(bits):
    mu = 2**bits - 1

    def compand(v):
        return torch.sign(v) * torch.log1p(mu * v.abs()) / math.log1p(mu)

    x = torch.rand(100_000, dtype=torch.float64) * 2 - 1
    y = dequantize(quantize(x, bits, "mu-law"), bits, "mu-law").double()
    assert (compand(y) - compand(x)).abs().max().item() <= 2 / mu + 1e-6
    # mu-law is finer than linear near silence: quiet samples come back more precisely
    quiet = x * 0.01
    mu_err = (dequantize(quantize(quiet, bits, "mu-law"), bits, "mu-law").double() - quiet).abs().max()
    lin_err = (dequantize(quantize(quiet, bits, "linear"), bits, "linear").double() - quiet).abs().max()
    assert mu_err < lin_err


def test_out_of_range_input_is_clipped_and_bad_arguments_are_refused():
    assert quantize(torch.tensor([-3.0, 3.0]), 8, "linear").tolist() == [0, 255]
    with pytest.raises(ValueError, match="kind"):
        quantize(torch.zeros(1), 8, "a-law")
    with pytest.raises(ValueError, match="bits"):
        zero_level(0, "linear")


@pytest.mark.parametrize("kind", ["mu-law", "linear"])
def test_quantize_matches_the_level_formula_on_every_16_bit_sample(kind):
    """The fused in-place steps give exactly floor(u * (2**bits - eps) + eps / 2) of the written-out formula."""
    x = torch.arange(-32768, 32768, dtype=torch.float32) / 32768
    companded = torch.sign(x) * torch.log(1 + 255 * x.abs()) / math.log1p(255) if kind == "mu-law" else x
    expected = torch.floor((companded + 1) * ((256 - 0.01) / 2) + 0.01 / 2).long()
    assert torch.equal(quantize(x, 8, kind), expected)


@pytest.mark.parametrize("kind", ["mu-law", "linear"])
@pytest.mark.parametrize("bits", [1, 8, 16])
def test_the_pcm_table_equals_quantize_of_the_decoded_floats(kind, bits):
    """Every 16-bit value, and every mean of two (stereo folded to mono), gets the level quantize gives it."""
    pcm = np.arange(-32768, 32768).astype(np.int16)
    floats = torch.from_numpy(pcm.astype(np.float32) / 32768)  # what float decoding of the member returns
    assert np.array_equal(pcm16_table(bits, kind)[pcm.view(np.uint16)], quantize(floats, bits, kind).numpy())
    left, right = pcm, np.roll(pcm, 12345)
    mean = (floats + torch.from_numpy(right.astype(np.float32) / 32768)) / 2
    index = (left.astype(np.int32) + right) & (2 * 65536 - 1)
    assert np.array_equal(pcm16_table(bits, kind, channels=2)[index], quantize(mean, bits, kind).numpy())
