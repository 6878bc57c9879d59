"""S4 kernels against direct evaluations of the state-space model they claim to compute."""

from __future__ import annotations

import math

import pytest
import torch

from dist_audio.models.s4 import (
    DPLRKernel,
    S4Layer,
    SSMOptions,
    causal_fft_conv,
    hippo_legs_nplr,
    vandermonde_kernel,
)

torch.set_default_dtype(torch.float32)

KERNELS = [("diag", "diag-lin"), ("diag", "diag-inv"), ("dplr", "legs")]


def _unrolled_kernel(dA: torch.Tensor, dB: torch.Tensor, dC: torch.Tensor, length: int) -> torch.Tensor:
    """K[h, l] = Re(dC · dA^l · dB) by repeated multiplication with a dense dA [h, m, m]."""
    x, taps = dB.clone(), []
    for _ in range(length):
        taps.append((dC * x).sum(-1).real)
        x = (dA @ x[..., None])[..., 0]
    return torch.stack(taps, dim=-1)


def test_vandermonde_matches_direct_sum():
    torch.manual_seed(0)
    weights = torch.randn(3, 5, dtype=torch.complex128)
    exponents = torch.complex(-torch.rand(3, 5, dtype=torch.float64), 3 * torch.randn(3, 5, dtype=torch.float64))
    for length in (1, 7, 100, 333):
        l = torch.arange(length, dtype=torch.float64)
        direct = 2 * (weights[..., None] * torch.exp(exponents[..., None] * l)).sum(1).real
        torch.testing.assert_close(vandermonde_kernel(weights, exponents, length), direct, rtol=1e-10, atol=1e-12)


def test_causal_fft_conv_matches_direct_convolution():
    torch.manual_seed(0)
    u, k = torch.randn(2, 50, 3, dtype=torch.float64), torch.randn(3, 50, dtype=torch.float64)
    direct = torch.zeros_like(u)
    for t in range(50):
        direct[:, t] = (k[:, : t + 1].flip(-1).T[None] * u[:, : t + 1]).sum(1)
    torch.testing.assert_close(causal_fft_conv(u, k), direct)


@pytest.mark.parametrize(("mode", "init"), KERNELS)
def test_kernel_equals_its_recurrence(mode, init):
    torch.manual_seed(0)
    layer = S4Layer(4, SSMOptions(mode=mode, init=init, d_state=16, l_max=300, kernel_chunk=37)).double()
    rec = layer.kernel.recurrence()
    x, impulse_response = rec.zeros(1), []
    for t in range(300):
        x, y = rec.step(x, torch.full((1, 4), float(t == 0), dtype=torch.float64))
        impulse_response.append(y[0])
    torch.testing.assert_close(layer.kernel(300), torch.stack(impulse_response, -1), rtol=1e-8, atol=1e-10)


def test_legs_nplr_has_the_legs_spectrum():
    """Λ − P P* with the conjugate modes is similar to HiPPO-LegS, whose eigenvalues are −1 … −N."""
    lam, p, _ = hippo_legs_nplr(16)
    lam_full, p_full = torch.cat([lam, lam.conj()]), torch.cat([p, p.conj()])
    eig = torch.linalg.eigvals(torch.diag(lam_full) - torch.outer(p_full, p_full.conj()))
    # LegS is far from normal, so its eigenvalues move ~1e-5 under float64 rounding of the factors
    torch.testing.assert_close(eig.real.sort().values, -torch.arange(16, 0, -1, dtype=torch.float64),
                               rtol=0, atol=1e-3)
    assert eig.imag.abs().max() < 1e-3


def test_dplr_kernel_matches_dense_bilinear_system():
    """Cauchy + Woodbury at the roots of unity equals the dense bilinear SSM with C = C̃ (I − Ā^L)^{-1}."""
    torch.manual_seed(0)
    length = 128
    kernel = DPLRKernel(3, SSMOptions(mode="dplr", init="legs", d_state=8, l_max=length, kernel_chunk=20)).double()
    with torch.no_grad():
        kernel.lam_log_re.uniform_(-2, 1)  # leave the init: test generic Λ, P, B
        kernel.P.normal_()
        kernel.B.normal_()
    lam = torch.complex(-torch.exp(kernel.lam_log_re), kernel.lam_im)
    p, b, c = (torch.view_as_complex(t).detach() for t in (kernel.P, kernel.B, kernel.C))
    lam_f, p_f, b_f = (torch.cat([z, z.conj()]) for z in (lam.detach(), p, b))
    a = torch.diag(lam_f) - torch.outer(p_f, p_f.conj())
    dt = torch.exp(kernel.log_dt.detach())[:, None, None]
    eye = torch.eye(8, dtype=torch.complex128)
    dA = torch.linalg.solve(eye - dt / 2 * a, eye + dt / 2 * a)
    dB = torch.linalg.solve(eye - dt / 2 * a, dt[..., 0] * b_f)
    c_true = torch.linalg.solve((eye - torch.linalg.matrix_power(dA, length)).mT, torch.cat([c, c.conj()], -1))
    expected = _unrolled_kernel(dA, dB, c_true, length)
    torch.testing.assert_close(kernel(length).detach(), expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(kernel(50).detach(), expected[:, :50], rtol=1e-8, atol=1e-10)


def test_dplr_chunking_changes_neither_values_nor_gradients():
    torch.manual_seed(0)
    whole = DPLRKernel(4, SSMOptions(mode="dplr", init="legs", d_state=8, l_max=256, kernel_chunk=1000))
    chunked = DPLRKernel(4, SSMOptions(mode="dplr", init="legs", d_state=8, l_max=256, kernel_chunk=16))
    chunked.load_state_dict(whole.state_dict())
    weights = torch.randn(4, 256)
    grads = []
    for kernel in (whole, chunked):
        (kernel(256) * weights).sum().backward()
        grads.append([p.grad for p in kernel.parameters()])
    torch.testing.assert_close(whole(256), chunked(256))
    for g_whole, g_chunked in zip(*grads):
        torch.testing.assert_close(g_whole, g_chunked, rtol=1e-4, atol=1e-6)


def test_dplr_refuses_inputs_longer_than_l_max():
    layer = S4Layer(2, SSMOptions(mode="dplr", init="legs", d_state=4, l_max=16))
    with pytest.raises(ValueError, match="l_max"):
        layer(torch.randn(1, 17, 2))


def test_dt_is_log_uniform_in_range():
    torch.manual_seed(0)
    layer = S4Layer(2000, SSMOptions(d_state=2, dt_min=1e-3, dt_max=1e-1))
    log_dt = layer.kernel.log_dt.detach()
    assert log_dt.min() >= math.log(1e-3) and log_dt.max() <= math.log(1e-1)
    assert abs(log_dt.mean().item() - math.log(1e-2)) < 0.1  # midpoint of the log range


@pytest.mark.parametrize(("mode", "init"), KERNELS)
def test_layer_gradients_match_finite_differences(mode, init):
    """The fused conv + skip + GELU backward (recomputed FFTs) against numerical derivatives."""
    torch.manual_seed(0)
    layer = S4Layer(3, SSMOptions(mode=mode, init=init, d_state=4, l_max=24, kernel_chunk=5), glu=True).double()
    u = torch.randn(2, 24, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: layer(v), (u,))
    names = ["D", "kernel.log_dt", "kernel.C", "kernel.B", "output_weight", "output_bias"]
    params = dict(layer.named_parameters())
    assert torch.autograd.gradcheck(
        lambda *ps: torch.func.functional_call(layer, dict(zip(names, ps)), (u.detach(),)),
        [params[n].detach().clone().requires_grad_(True) for n in names])
