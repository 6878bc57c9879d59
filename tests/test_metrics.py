"""uSDR, cSDR, BSSEval v4 (museval) and bits per sample."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from dist_audio.metrics import bits_per_sample, bsseval_sdr, csdr, frame_sdr, usdr


def test_usdr_matches_the_definition():
    torch.manual_seed(0)
    ref = torch.randn(3, 2, 1000)
    noise = 0.1 * torch.randn(3, 2, 1000)
    expected = 10 * torch.log10(ref.square().sum(dim=(1, 2)) / noise.square().sum(dim=(1, 2)))
    torch.testing.assert_close(usdr(ref, ref + noise), expected, atol=1e-4, rtol=0)
    assert usdr(ref, ref).min() > 60  # perfect estimate: bounded by the stabiliser, not inf
    assert usdr(ref, torch.zeros_like(ref)).abs().max() < 1e-4  # silence: 0 dB


def test_usdr_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        usdr(torch.zeros(2, 100), torch.zeros(2, 99))


def test_frame_sdr_skips_silent_frames_and_csdr_takes_medians():
    torch.manual_seed(0)
    rate = 100
    ref = torch.randn(2, 2, 5 * rate)
    ref[1, :, :rate] = 0  # a silent first second in the second stem
    gains = torch.tensor([0.1, 0.01, 0.3, 0.1, 0.2]).repeat_interleave(rate)  # error level per second
    est = ref + gains * torch.randn_like(ref) * ref.std()
    frames = frame_sdr(ref, est, rate)
    assert frames.shape == (2, 5) and torch.isnan(frames[1, 0]) and not torch.isnan(frames[0]).any()
    per_track = frames.nanmedian(dim=-1).values
    other = (ref.flip(-1), est.flip(-1))
    torch.testing.assert_close(csdr([ref, *other[:1]], [est, *other[1:]], rate),
                               torch.stack([per_track, frame_sdr(*other, rate).nanmedian(-1).values]).median(0).values)


def test_bsseval_path_agrees_with_csdr_on_additive_noise():
    """BSSEval may absorb a short filter of the error; for white noise that changes SDR very little."""
    if importlib.util.find_spec("museval") is None:
        pytest.skip("museval is not installed")
    torch.manual_seed(0)
    rate = 8000
    ref = torch.randn(2, 2, 3 * rate) * torch.tensor([1.0, 0.3]).view(2, 1, 1)
    est = ref + 0.2 * torch.randn_like(ref) * torch.tensor([1.0, 0.3]).view(2, 1, 1)
    ours = csdr([ref], [est], rate)
    torch.testing.assert_close(bsseval_sdr(ref, est, rate), ours, atol=0.3, rtol=0)


def test_bits_per_sample():
    assert bits_per_sample(math.log(256)) == pytest.approx(8.0)
    torch.testing.assert_close(bits_per_sample(torch.tensor([math.log(2)])), torch.tensor([1.0]))
