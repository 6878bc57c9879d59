"""TSA, FSA and (shifted) window attention against brute-force masked full attention."""

from __future__ import annotations

import math

import pytest
import torch

from dist_audio.models.tf_attention import FrequencyAttention, TimeAttention, WindowAttention, axis_segments

DIM, HEADS = 8, 2


def explicit_attention(layer, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Full softmax(QKᵀ/√d)V over all t·f tokens of ``x [b, t, f, d]``; ``allowed [t·f, t·f]`` masks pairs."""
    b, t, f, d = x.shape
    h = layer.heads
    q, k, v = layer.qkv(x).reshape(b, t * f, 3, h, d // h).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // h)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return layer.proj((weights @ v).permute(0, 2, 1, 3).reshape(b, t, f, d))


def grid(t: int, f: int) -> tuple[torch.Tensor, torch.Tensor]:
    tt, ff = torch.meshgrid(torch.arange(t), torch.arange(f), indexing="ij")
    return tt.flatten(), ff.flatten()


def same(ids: torch.Tensor) -> torch.Tensor:
    return ids[:, None] == ids[None, :]


def swin_allowed(t: int, f: int, window: tuple[int, int], shifted: bool) -> torch.Tensor:
    """Swin's recipe: roll the map by half a window, partition, and mask the wrap-around regions."""
    (wt, wf), (tt, ff) = window, grid(t, f)
    st, sf = (wt // 2, wf // 2) if shifted else (0, 0)
    rt, rf = (tt - st) % t, (ff - sf) % f  # where each token lands after torch.roll(x, (-st, -sf))
    window_id = (rt // wt) * (f // wf) + rf // wf

    def region(r: torch.Tensor, size: int, w: int, s: int) -> torch.Tensor:  # slices (0,-w), (-w,-s), (-s,)
        return (r >= size - w).long() + (r >= size - s).long() if s else torch.zeros_like(r)

    region_id = region(rt, t, wt, st) * 3 + region(rf, f, wf, sf)
    return same(window_id) & same(region_id)


@pytest.mark.parametrize(("t", "f", "window"), [(16, 24, (4, 8)), (8, 8, (4, 4)), (12, 16, (4, 4))])
@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_equals_swin_masked_reference(t, f, window, shifted):
    torch.manual_seed(0)
    layer = WindowAttention(DIM, HEADS, window, shifted=shifted)
    x = torch.randn(2, t, f, DIM)
    expected = explicit_attention(layer, x, swin_allowed(t, f, window, shifted))
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_shifted_windows_differ_from_regular_ones():
    torch.manual_seed(0)
    x = torch.randn(1, 8, 8, DIM)
    regular = WindowAttention(DIM, HEADS, (4, 4), shifted=False)
    shifted = WindowAttention(DIM, HEADS, (4, 4), shifted=True)
    shifted.load_state_dict(regular.state_dict())
    assert not torch.allclose(regular(x), shifted(x), atol=1e-3)


def test_no_token_attends_across_the_shifted_boundary():
    """Tokens at opposite ends share a rolled window in Swin, but the mask must keep them apart."""
    torch.manual_seed(0)
    t, f = 8, 8
    layer = WindowAttention(DIM, HEADS, (4, 4), shifted=True)
    x = torch.randn(1, t, f, DIM, requires_grad=True)
    out = layer(x)
    for target in [(t - 1, f - 1), (t - 1, 0), (0, f - 1), (1, 1)]:
        (grad,) = torch.autograd.grad(out[0, target[0], target[1]].sum(), x, retain_graph=True)
        sources = {tuple(p) for p in (grad[0].abs().sum(-1) > 0).nonzero().tolist()}
        # the shifted window holding (0, 0) is exactly the 2×2 corner piece [0, 2) × [0, 2)
        if target == (1, 1):
            assert sources == {(a, b) for a in range(2) for b in range(2)}
        else:
            assert (0, 0) not in sources and (1, 1) not in sources
            assert all(abs(a - target[0]) < 4 and abs(b - target[1]) < 4 for a, b in sources)


@pytest.mark.parametrize(("t", "f", "window"), [(10, 13, (4, 4)), (5, 3, (8, 8)), (9, 20, (4, 6))])
@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_on_sizes_that_are_not_window_multiples(t, f, window, shifted):
    """Partial windows at the end (no padding): a token attends exactly the tokens of its piece."""
    torch.manual_seed(0)
    layer = WindowAttention(DIM, HEADS, window, shifted=shifted)
    tt, ff = grid(t, f)

    def piece(o: torch.Tensor, size: int, w: int) -> torch.Tensor:
        w = min(w, size)
        s = w // 2 if shifted and size > w else 0
        return (o + (w - s) % w) // w

    allowed = same(piece(tt, t, window[0])) & same(piece(ff, f, window[1]))
    x = torch.randn(2, t, f, DIM)
    torch.testing.assert_close(layer(x), explicit_attention(layer, x, allowed), atol=1e-5, rtol=1e-5)


def test_time_and_frequency_attention_equal_per_axis_reference():
    torch.manual_seed(0)
    t, f = 7, 11
    tt, ff = grid(t, f)
    x = torch.randn(2, t, f, DIM)
    tsa, fsa = TimeAttention(DIM, HEADS), FrequencyAttention(DIM, HEADS)
    torch.testing.assert_close(tsa(x), explicit_attention(tsa, x, same(ff)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fsa(x), explicit_attention(fsa, x, same(tt)), atol=1e-5, rtol=1e-5)


def test_axis_segments():
    assert axis_segments(16, 8, shifted=False) == [(0, 16, 8)]
    assert axis_segments(16, 8, shifted=True) == [(0, 4, 4), (4, 12, 8), (12, 16, 4)]
    assert axis_segments(20, 8, shifted=False) == [(0, 16, 8), (16, 20, 4)]
    assert axis_segments(5, 8, shifted=True) == [(0, 5, 5)]  # shorter than a window: one block, no shift


def test_width_must_split_into_heads():
    with pytest.raises(ValueError, match="divisible"):
        TimeAttention(10, 4)
