"""S4 layers in pure PyTorch: the S4D (diagonal) and S4 (diagonal plus low rank) kernels.

Each of the H channels runs a linear state-space model x' = A x + B u, y = C x with N = d_state
real states, stored as n = N/2 complex modes whose conjugates are implied, so every kernel is real.
Training convolves with the kernel K[l] = C Ā^l B̄ (FFT of length 2L); generation runs the recurrence
x ← Ā x + B̄ u, one step per sample, at O(N) cost per channel.

- ``diag`` (S4D, Gu et al. 2022): diagonal A, zero-order hold. K is a Vandermonde product, evaluated
  here as one batched matmul of [H, L/c, 2n] by [H, 2n, c] factors with c ≈ √L, so neither the forward
  nor autograd ever holds an [H, n, L] tensor.
- ``dplr`` (S4, Gu et al. 2021): A = Λ − P P*, bilinear discretisation. Its truncated generating
  function is evaluated at the roots of unity with Cauchy sums and a Woodbury correction, then
  inverted with an irfft; the frequencies are processed in chunks that are recomputed in backward,
  so memory stays bounded at any length. As in S4 the learned C is C̃ = C (I − Ā^L) for the layer's
  ``l_max``; generation folds it back once and steps with a Sherman–Morrison solve.

A, B, P are shared by the channels (S4's n_ssm = 1); Δ and C are per channel.

Precision (``dist_audio.models.precision``): the kernels (Δ, A, B, C, P, the discretisation, Vandermonde
and Cauchy sums) and the FFT convolution are float32 islands; the kernel modules are the model's
``fp32_classes``; the layer's output linear runs in the training precision.
Axes: b batch, l length, h channels, n complex modes, c chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dist_audio.models.precision import as_float32, float32

__all__ = ["DPLRKernel", "DPLRRecurrence", "DiagKernel", "DiagRecurrence", "Recurrence", "S4Layer", "SSMOptions",
           "causal_fft_conv", "hippo_legs_nplr", "linear_parameters", "vandermonde_kernel"]


@dataclass(frozen=True)
class SSMOptions:
    """Plain settings of one S4 layer's state-space kernel (built from ``S4Config``)."""

    mode: Literal["diag", "dplr"] = "diag"
    init: Literal["diag-lin", "diag-inv", "legs"] = "diag-lin"
    d_state: int = 64
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    l_max: int = 16384  # dplr: the length C̃ is defined at (this layer's resolution)
    kernel_chunk: int = 64  # dplr: frequencies per recomputed chunk (small chunks stay in cache)


def _planar(z: Tensor) -> Tensor:
    """Complex [...] as real [2, ...] (real parts, imaginary parts)."""
    return torch.stack([z.real, z.imag])


def _mul_add(z: Tensor, re: Tensor, im: Tensor, w: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """z·x + w·u for planar z, w [2, h, n], x = re + i·im [b, h, n] and real u [b, h, 1], as (re, im)."""
    out_re = torch.addcmul(w[0] * u, z[0], re).addcmul_(z[1], im, value=-1)
    out_im = torch.addcmul(w[1] * u, z[0], im).addcmul_(z[1], re)
    return out_re, out_im


def _real_dot(c: Tensor, re: Tensor, im: Tensor) -> Tensor:
    """Re(Σ_n c·x) for planar c [2, h, n] and x = re + i·im [b, h, n]."""
    return torch.addcmul(c[0] * re, c[1], im, value=-1).sum(-1)


@dataclass
class DiagRecurrence:
    """Diagonal discrete system on [h, n] modes: x ← dA·x + dB·u, y = Re(Σ dC·x).

    Complex numbers are kept planar and real, [2, ...] = (real, imaginary), and the state [2, b, h, n]
    is updated in place: a step is a few real elementwise ops and a sum, which the ahead-of-time
    compiler fuses into one loop (inductor has no complex dtype).
    """

    dA: Tensor  # [2, h, n]
    dB: Tensor  # [2, h, n]
    dC: Tensor  # [2, h, n]

    def zeros(self, batch_size: int) -> Tensor:
        return self.dA.new_zeros(2, batch_size, *self.dA.shape[1:])

    def step(self, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """x [2, b, h, n] (updated in place), u [b, h] → (x, y [b, h])."""
        re, im = _mul_add(self.dA, x[0], x[1], self.dB, u[..., None])
        x.copy_(torch.stack([re, im]))
        return x, _real_dot(self.dC, re, im)


@dataclass
class DPLRRecurrence:
    """One bilinear step of A = Λ − P P* in the Λ basis, O(N) per channel via Sherman–Morrison.

    On the n kept modes (their conjugates implied) A·x = Λx − 2P·Re(P*x), so
    (I − Δ/2·A) x' = (I + Δ/2·A) x + ΔB u is solved with D = (1 − Δ/2·Λ)^{-1}:
    w = D·((1 + Δ/2·Λ)x − ΔP·Re(P*x) + ΔB u), x' = w − ΔDP·Re(P*w)/(1 + Δ·Re(P*DP)), y = 2 Re(C·x').
    Diagonalising the whole Ā instead is ill-conditioned for HiPPO-LegS (eigenvector condition
    numbers ~1e8 at N = 64), which wrecks float32 generation. Planar and real like ``DiagRecurrence``.
    """

    p: Tensor  # [2, n]
    forward_part: Tensor  # D·(1 + Δ/2·Λ), [2, h, n]
    p_part: Tensor  # D·Δ·P, [2, h, n]
    b_part: Tensor  # D·Δ·B, [2, h, n]
    correction: Tensor  # 1 / (1 + Δ·Re(P*DP)), [h, 1]
    dC: Tensor  # 2·C (C̃ folded back), [2, h, n]

    def zeros(self, batch_size: int) -> Tensor:
        return self.forward_part.new_zeros(2, batch_size, *self.forward_part.shape[1:])

    def step(self, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """x [2, b, h, n] (updated in place), u [b, h] → (x, y [b, h])."""
        q = self.p_part
        w_re, w_im = _mul_add(self.forward_part, x[0], x[1], self.b_part, u[..., None])
        r = self._re_p_dot(x[0], x[1])
        w_re, w_im = w_re.addcmul_(q[0], r, value=-1), w_im.addcmul_(q[1], r, value=-1)
        s = self._re_p_dot(w_re, w_im) * self.correction
        re, im = w_re.addcmul_(q[0], s, value=-1), w_im.addcmul_(q[1], s, value=-1)
        x.copy_(torch.stack([re, im]))
        return x, _real_dot(self.dC, re, im)

    def _re_p_dot(self, re: Tensor, im: Tensor) -> Tensor:
        """Re(P*·x) over the modes, keeping the mode axis for broadcasting."""
        return torch.addcmul(self.p[0] * re, self.p[1], im).sum(-1, keepdim=True)


Recurrence = DiagRecurrence | DPLRRecurrence


def _complex(p: Tensor) -> Tensor:
    """A real [..., 2] parameter as complex64 (upcast first: there is no complex bf16)."""
    return torch.view_as_complex(as_float32(p))


def _complex_param(z: Tensor) -> nn.Parameter:
    """Complex values stored as a real [..., 2] parameter (optimisers and FSDP stay real-valued)."""
    return nn.Parameter(torch.view_as_real(z.to(torch.complex64)).clone())


def _log_dt(channels: int, dt_min: float, dt_max: float) -> nn.Parameter:
    """log Δ uniform in [log dt_min, log dt_max] (S4 section 3)."""
    u = torch.rand(channels)
    return nn.Parameter(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))


def _random_c(channels: int, modes: int) -> nn.Parameter:
    return _complex_param(torch.randn(channels, modes, dtype=torch.cfloat))  # unit variance overall


def diag_init(modes: int, kind: str) -> Tensor:
    """S4D initialisations of the diagonal A (n modes, imaginary parts > 0)."""
    n = torch.arange(modes, dtype=torch.float64)
    if kind == "diag-lin":
        imag = math.pi * n
    elif kind == "diag-inv":
        N = 2 * modes
        imag = N / math.pi * (N / (2 * n + 1) - 1)
    else:
        raise ValueError(f"unknown diagonal init {kind!r} (diag-lin | diag-inv)")
    return torch.complex(torch.full_like(n, -0.5), imag)


def hippo_legs_nplr(d_state: int) -> tuple[Tensor, Tensor, Tensor]:
    """HiPPO-LegS as Λ − P P* in the eigenbasis of its normal part: (Λ, P, B), n = d_state/2 modes each.

    LegS A[i, j] = −√(2i+1)√(2j+1) below the diagonal, −(i+1) on it; with P[i] = √(i + ½) the sum
    A + P Pᵀ is −½ I plus a skew-symmetric matrix, diagonalised by a unitary V. The modes with
    positive imaginary part are kept; the others are their conjugates.
    """
    i = torch.arange(d_state, dtype=torch.float64)
    root = torch.sqrt(2 * i + 1)
    legs = -torch.tril(torch.outer(root, root), -1) - torch.diag(i + 1)
    p = torch.sqrt(i + 0.5)
    skew = legs + torch.outer(p, p) + 0.5 * torch.eye(d_state, dtype=torch.float64)
    freqs, vectors = torch.linalg.eigh(-1j * skew.to(torch.complex128))  # skew = V diag(i·freqs) V*
    keep = freqs > 0
    lam = torch.complex(torch.full_like(freqs[keep], -0.5), freqs[keep])
    v_keep = vectors[:, keep]
    return lam, v_keep.mH @ p.to(torch.complex128), v_keep.mH @ root.to(torch.complex128)


def vandermonde_kernel(weights: Tensor, exponents: Tensor, length: int) -> Tensor:
    """K[h, l] = 2 Re Σ_n w[h, n] exp(z[h, n]·l) for l < length, as a real [H, length] tensor.

    With l = i·c + j, exp(z l) = exp(z c i)·exp(z j): one real batched matmul of [H, L/c, 2n] by
    [H, 2n, c] with c ≈ √L. Memory and autograd's saved tensors are O(H·n·√L) besides the result.
    """
    block = 1 << math.ceil(math.log2(max(length, 1)) / 2)
    rows = -(-length // block)
    real = weights.real.dtype
    inner = _cexp(exponents[..., None] * torch.arange(block, device=weights.device, dtype=real))
    outer = weights[..., None] * _cexp(
        exponents[..., None] * (block * torch.arange(rows, device=weights.device, dtype=real)))
    lhs = torch.cat([outer.real, -outer.imag], dim=1).transpose(1, 2)  # [h, rows, 2n]
    rhs = torch.cat([inner.real, inner.imag], dim=1)  # [h, 2n, block]
    return 2 * (lhs @ rhs).reshape(weights.shape[0], rows * block)[:, :length]


def _cexp(z: Tensor) -> Tensor:
    """exp of a complex tensor through real exp/cos/sin, which vectorise (≈3× faster on CPU)."""
    return torch.polar(torch.exp(z.real), z.imag)


def _spectrum(x: Tensor, n: int) -> Tensor:
    """rfft over time of [b, l, h] → [b, h, n/2 + 1]; transforming contiguous rows is ~2× faster."""
    return torch.fft.rfft(x.transpose(1, 2).contiguous(), n=n, dim=-1)


def _waveform(spectrum: Tensor, n: int, length: int) -> Tensor:
    """Inverse of ``_spectrum``, cropped to the first ``length`` steps: [b, h, f] → [b, length, h]."""
    return torch.fft.irfft(spectrum, n=n, dim=-1)[..., :length].transpose(1, 2)


def causal_fft_conv(u: Tensor, kernel: Tensor) -> Tensor:
    """y[b, l, h] = Σ_{s ≤ l} kernel[h, s]·u[b, l − s, h], by FFTs of length 2L (no wrap-around)."""
    n = 2 * u.shape[1]
    return _waveform(_spectrum(u, n) * torch.fft.rfft(kernel, n=n, dim=-1), n, u.shape[1])


class _ConvSkipGELU(torch.autograd.Function):
    """GELU(K ∗ u + D·u), saving only u, K and D: backward recomputes the FFTs instead of keeping
    the padded input, its spectrum and the pre-activation (five [b, l, h]-sized tensors per layer)."""

    @staticmethod
    def forward(ctx, u: Tensor, kernel: Tensor, skip: Tensor) -> Tensor:
        ctx.save_for_backward(u, kernel, skip)
        work = _fft_dtype(u)
        return F.gelu(causal_fft_conv(u.to(work), kernel.to(work)) + u.to(work) * skip.to(work)).to(u.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        u, kernel, skip = ctx.saved_tensors
        work = _fft_dtype(u)
        u_w, skip_w = u.to(work), skip.to(work)
        length, n = u.shape[1], 2 * u.shape[1]
        u_f = _spectrum(u_w, n)
        k_f = torch.fft.rfft(kernel.to(work), n=n, dim=-1)
        pre = _waveform(u_f * k_f, n, length) + u_w * skip_w
        grad_pre = torch.ops.aten.gelu_backward(grad.to(work), pre)
        del pre
        g_f = _spectrum(grad_pre, n)  # correlations with K and u: products with conjugate spectra
        grad_u = _waveform(g_f * k_f.conj(), n, length) + grad_pre * skip_w
        grad_kernel = torch.fft.irfft((g_f * u_f.conj()).sum(0), n=n, dim=-1)[:, :length]
        grad_skip = (grad_pre * u_w).sum((0, 1))
        return grad_u.to(u.dtype), grad_kernel.to(kernel.dtype), grad_skip.to(skip.dtype)


class _LinearGLU(torch.autograd.Function):
    """GLU(a Wᵀ + b) saving only a (kept anyway) and W: the [b, l, 2h] pre-GLU tensor is recomputed."""

    @staticmethod
    def forward(ctx, a: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        y = F.linear(a, weight, bias)  # under autocast this runs in the autocast dtype
        ctx.save_for_backward(a, weight, bias)
        ctx.compute_dtype = y.dtype
        return F.glu(y, dim=-1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, weight, bias = ctx.saved_tensors
        a_c, w_c, grad_c = a.to(ctx.compute_dtype), weight.to(ctx.compute_dtype), grad.to(ctx.compute_dtype)
        y = F.linear(a_c, w_c, bias.to(ctx.compute_dtype))
        grad_y = torch.ops.aten.glu_backward(grad_c, y, -1).flatten(0, -2)
        grad_a = (grad_y @ w_c).view_as(a)
        return (grad_a.to(a.dtype), (grad_y.T @ a_c.flatten(0, -2)).to(weight.dtype),
                grad_y.sum(0).to(bias.dtype))


def linear_parameters(d_in: int, d_out: int) -> tuple[nn.Parameter, nn.Parameter]:
    """Weight [out, in] and bias initialised as ``nn.Linear``, for modules that fuse their matmuls."""
    layer = nn.Linear(d_in, d_out)
    return layer.weight, layer.bias


def _fft_dtype(t: Tensor) -> torch.dtype:
    """The convolution is a float32 island whatever the activations' dtype: there are no bf16 FFTs,
    and a kernel spanning 10^4 steps loses its tail in 8 mantissa bits."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class DiagKernel(nn.Module):
    """S4D: diagonal A = −exp(a_re) + i·a_im, zero-order hold discretisation."""

    def __init__(self, channels: int, opts: SSMOptions):
        super().__init__()
        modes = opts.d_state // 2
        a = diag_init(modes, opts.init)
        self.log_dt = _log_dt(channels, opts.dt_min, opts.dt_max)
        self.a_log_re = nn.Parameter(torch.log(-a.real).float())
        self.a_im = nn.Parameter(a.imag.float())
        self.B = _complex_param(torch.ones(modes, dtype=torch.cfloat))
        self.C = _random_c(channels, modes)

    def ssm_parameters(self) -> list[nn.Parameter]:
        return [self.log_dt, self.a_log_re, self.a_im, self.B]

    def _discrete(self) -> tuple[Tensor, Tensor]:
        """Δ·A [H, n] and the ZOH input matrix B̄ = (exp(ΔA) − 1)/A · B."""
        a = torch.complex(-torch.exp(as_float32(self.a_log_re)), as_float32(self.a_im))
        dt_a = torch.exp(as_float32(self.log_dt))[:, None] * a
        return dt_a, torch.expm1(dt_a) / a * _complex(self.B)

    @float32
    def forward(self, length: int) -> Tensor:
        dt_a, dB = self._discrete()
        return vandermonde_kernel(_complex(self.C) * dB, dt_a, length)

    @torch.no_grad()
    def recurrence(self) -> DiagRecurrence:
        dt_a, dB = self._discrete()
        return DiagRecurrence(_planar(_cexp(dt_a)), _planar(dB), _planar(2 * _complex(self.C)))


class DPLRKernel(nn.Module):
    """S4: A = Λ − P P* (HiPPO-LegS init), bilinear discretisation, C learned as C̃ = C(I − Ā^l_max)."""

    def __init__(self, channels: int, opts: SSMOptions):
        super().__init__()
        lam, p, b = hippo_legs_nplr(opts.d_state)
        self.l_max = opts.l_max
        self.chunk = opts.kernel_chunk
        self.log_dt = _log_dt(channels, opts.dt_min, opts.dt_max)
        self.lam_log_re = nn.Parameter(torch.log(-lam.real).float())
        self.lam_im = nn.Parameter(lam.imag.float())
        self.P = _complex_param(p)
        self.B = _complex_param(b)
        self.C = _random_c(channels, lam.shape[0])

    def ssm_parameters(self) -> list[nn.Parameter]:
        return [self.log_dt, self.lam_log_re, self.lam_im, self.P, self.B]

    def _lam(self) -> Tensor:
        return torch.complex(-torch.exp(as_float32(self.lam_log_re)), as_float32(self.lam_im))

    @float32
    def forward(self, length: int) -> Tensor:
        if length > self.l_max:
            raise ValueError(f"dplr kernel asked for length {length} > its l_max {self.l_max} "
                             "(raise model.s4.l_max to the training length in samples)")
        lam, p, b, c = self._lam(), _complex(self.P), _complex(self.B), _complex(self.C)
        dt = torch.exp(as_float32(self.log_dt))
        numerators = torch.stack([c * b, c * p, (p.conj() * b).expand_as(c), (p.conj() * p).expand_as(c)], 1)
        freqs = self.l_max // 2 + 1
        k = torch.arange(freqs, device=dt.device, dtype=dt.dtype)
        omega = torch.exp(torch.complex(torch.zeros_like(k), -2 * math.pi * k / self.l_max))
        parts = []
        for start in range(0, freqs, self.chunk):
            args = (omega[start:start + self.chunk], dt, lam, numerators)
            if torch.is_grad_enabled() and dt.requires_grad:
                parts.append(checkpoint(_dplr_generating_function, *args, use_reentrant=False))
            else:
                parts.append(_dplr_generating_function(*args))
        spectrum = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        return torch.fft.irfft(spectrum, n=self.l_max, dim=-1)[:, :length]

    @torch.no_grad()
    def recurrence(self) -> DPLRRecurrence:
        """The O(N) bilinear step; C = C̃ (I − Ā^l_max)^{-1} is folded back once, densely in float64."""
        f64 = torch.complex128
        lam, p, b, c = (z.to(f64) for z in (self._lam(), _complex(self.P), _complex(self.B), _complex(self.C)))
        dt = torch.exp(self.log_dt.double())  # the fold-back is ill-conditioned: float64 throughout
        lam_f, p_f = torch.cat([lam, lam.conj()]), torch.cat([p, p.conj()])
        a = torch.diag(lam_f) - torch.outer(p_f, p_f.conj())
        eye = torch.eye(a.shape[0], dtype=f64, device=a.device)
        half = dt[:, None, None] / 2
        dA = torch.linalg.solve(eye - half * a, eye + half * a)
        c_full = torch.linalg.solve((eye - torch.linalg.matrix_power(dA, self.l_max)).mT,
                                    torch.cat([c, c.conj()], dim=-1))
        d = 1 / (1 - dt[:, None] / 2 * lam)
        p_part = d * dt[:, None] * p
        dtype = _complex(self.C).dtype
        return DPLRRecurrence(
            p=_planar(p.to(dtype)), forward_part=_planar((d * (1 + dt[:, None] / 2 * lam)).to(dtype)),
            p_part=_planar(p_part.to(dtype)), b_part=_planar((d * dt[:, None] * b).to(dtype)),
            correction=(1 / (1 + torch.linalg.vecdot(p, p_part).real))[:, None].to(dtype.to_real()),
            dC=_planar((2 * c_full[:, : lam.shape[0]]).to(dtype)))


def _dplr_generating_function(omega: Tensor, dt: Tensor, lam: Tensor, numerators: Tensor) -> Tensor:
    """Σ_l K[l] ω^l at the given roots of unity, [H, c].

    With g = (2/Δ)(1 − ω) and s = 1 + ω, the bilinear transform gives 2 C̃ (g − s A)^{-1} B; with
    R = (g − sΛ)^{-1} and Woodbury this is 2 (k00 − s·k01·k10 / (1 + s·k11)), k_xy = Σ_n x* R y over
    the modes and their conjugates. This form stays finite at ω = −1.
    """
    g = (2 / dt)[:, None, None] * (1 - omega)  # [h, 1, c]
    s = 1 + omega
    poles = torch.cat([lam, lam.conj()])[:, None]  # the kept modes and their conjugates
    resolvent = (g - s * poles).reciprocal()  # [h, 2n, c]; reciprocal() is ~15× faster than 1 / z
    k00, k01, k10, k11 = (torch.cat([numerators, numerators.conj()], -1) @ resolvent).unbind(1)
    return 2 * (k00 - s * k01 * k10 / (1 + s * k11))


class S4Layer(nn.Module):
    """y = Linear(GELU(K ∗ u + D·u)) on [B, L, H]; the output linear doubles to a GLU when ``glu``.

    The convolution, skip and GELU form one autograd function, and so do the output linear and GLU:
    both recompute their cheap intermediates in backward instead of storing [b, l, h]-sized tensors.
    """

    def __init__(self, d_model: int, opts: SSMOptions, *, glu: bool = False, dropout: float = 0.0):
        super().__init__()
        kernels = {"diag": DiagKernel, "dplr": DPLRKernel}
        if opts.mode not in kernels:
            raise ValueError(f"unknown S4 mode {opts.mode!r} (diag | dplr)")
        self.kernel = kernels[opts.mode](d_model, opts)
        self.D = nn.Parameter(torch.randn(d_model))
        self.dropout = nn.Dropout(dropout)
        self.glu = glu
        # owned directly (not an nn.Linear) so ZeRO-3 gathers them for this module's fused forward
        self.output_weight, self.output_bias = linear_parameters(d_model, 2 * d_model if glu else d_model)

    def forward(self, u: Tensor) -> Tensor:
        """u: [b, l, h] → [b, l, h]."""
        return self._mix(_ConvSkipGELU.apply(u, self.kernel(u.shape[1]), self.D))

    def _mix(self, activated: Tensor) -> Tensor:
        activated = self.dropout(activated)
        if self.glu:
            return _LinearGLU.apply(activated, self.output_weight, self.output_bias)
        return F.linear(activated, self.output_weight, self.output_bias)

    def default_state(self, batch_size: int) -> tuple[Tensor, Recurrence]:
        rec = self.kernel.recurrence()
        return rec.zeros(batch_size), rec

    def step(self, u: Tensor, state: tuple[Tensor, Recurrence]) -> Tensor:
        """One time step: u [b, h] → y [b, h]; the state is updated in place."""
        x, rec = state
        _, y = rec.step(x, u)
        y = F.linear(F.gelu(torch.addcmul(y, u, self.D)), self.output_weight, self.output_bias)
        return F.glu(y, dim=-1) if self.glu else y
