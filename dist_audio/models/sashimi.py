"""SaShiMi (Goel, Gu, Donahue, Ré 2022): a multi-scale S4 network over quantized waveform samples.

Shape legend: b batch, l length, h channels (d_model at the finest stage, ×expand per pooling).

    tokens → Embedding → [DownPool (+ blocks if unet)] per stage → center blocks
           → per stage, coarse to fine: UpPool + skip → blocks → LayerNorm → Linear → [b, l, out]

Residual blocks are x + Dropout(Layer(LayerNorm(x))) and alternate S4 and feed-forward layers.
DownPool folds p steps into channels; UpPool unfolds them and shifts right by one coarse step, so
every output depends only on inputs at or before its own position. The same network runs one
sample at a time (``default_state`` / ``step``) for generation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_audio.models.compile import compile_ahead_of_time
from dist_audio.models.s4 import DiagKernel, DPLRKernel, S4Layer, SSMOptions, linear_parameters

__all__ = ["DownPool", "FeedForward", "ResidualBlock", "SaShiMi", "SashimiState", "UpPool"]


class _FeedForwardFn(torch.autograd.Function):
    """Linear → GELU → Linear saving only the input: the [b, l, ff·h] hidden tensors (two of them,
    the largest activations in the model) are recomputed in backward from one matmul."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        hidden = F.linear(x, w1, b1)  # under autocast this runs in the autocast dtype
        ctx.save_for_backward(x, w1, b1, w2, b2)
        ctx.compute_dtype = hidden.dtype
        return F.linear(F.gelu(hidden), w2, b2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, ...]:
        x, w1, b1, w2, b2 = ctx.saved_tensors
        dtype = ctx.compute_dtype
        x_c, w1_c, w2_c = x.to(dtype).flatten(0, -2), w1.to(dtype), w2.to(dtype)
        grad_c = grad.to(dtype).flatten(0, -2)
        hidden = F.linear(x_c, w1_c, b1.to(dtype))
        grad_w2 = grad_c.T @ F.gelu(hidden)
        grad_hidden = torch.ops.aten.gelu_backward(grad_c @ w2_c, hidden)
        del hidden
        grad_x = (grad_hidden @ w1_c).view_as(x)
        return (grad_x.to(x.dtype), (grad_hidden.T @ x_c).to(w1.dtype), grad_hidden.sum(0).to(b1.dtype),
                grad_w2.to(w2.dtype), grad_c.sum(0).to(b2.dtype))


class FeedForward(nn.Module):
    """Linear(h → ff·h), GELU, Dropout, Linear(ff·h → h); stateless, so ``step`` is ``forward``.

    Parameters are owned directly (not nn.Linear children) so ZeRO-3 gathers them for the fused path.
    """

    def __init__(self, d_model: int, ff: int, dropout: float):
        super().__init__()
        self.w1, self.b1 = linear_parameters(d_model, ff * d_model)
        self.w2, self.b2 = linear_parameters(ff * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.dropout.p > 0:  # the dropout mask would have to be stored: unfused
            return F.linear(self.dropout(F.gelu(F.linear(x, self.w1, self.b1))), self.w2, self.b2)
        return _FeedForwardFn.apply(x, self.w1, self.b1, self.w2, self.b2)

    def default_state(self, batch_size: int) -> None:
        return None

    def step(self, x: Tensor, state: None) -> Tensor:
        return F.linear(F.gelu(F.linear(x, self.w1, self.b1)), self.w2, self.b2)


class ResidualBlock(nn.Module):
    """x + Dropout(layer(LayerNorm(x))): the unit wrapped by activation checkpointing and FSDP."""

    def __init__(self, layer: S4Layer | FeedForward, d_model: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.layer = layer
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.layer(self.norm(x)))

    def default_state(self, batch_size: int):
        return self.layer.default_state(batch_size)

    def step(self, x: Tensor, state) -> Tensor:
        """One sample, x [b, h] → [b, h]; the layer's state is updated in place."""
        norm = self.norm  # functional call: the module call machinery costs as much as the op here
        return x + self.layer.step(F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps), state)


class DownPool(nn.Module):
    """[b, l, h] → [b, l/p, expand·h]: p consecutive steps folded into channels, then a linear."""

    def __init__(self, d_model: int, expand: int, pool: int):
        super().__init__()
        self.pool = pool
        self.linear = nn.Linear(pool * d_model, expand * d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, l, h = x.shape
        return self.linear(x.reshape(b, l // self.pool, self.pool * h))


class UpPool(nn.Module):
    """[b, l/p, expand·h] → [b, l, h], shifted right by p steps so coarse step j feeds only steps ≥ (j+1)p."""

    def __init__(self, d_model: int, expand: int, pool: int):
        super().__init__()
        self.pool = pool
        self.linear = nn.Linear(expand * d_model, pool * d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, lc, _ = x.shape
        y = self.linear(x).reshape(b, lc * self.pool, -1)
        return F.pad(y[:, : -self.pool], (0, 0, self.pool, 0))


def _step(blocks: nn.ModuleList, x: Tensor, states: list) -> Tensor:
    """One sample through a stage's residual blocks, x [b, h] → [b, h]; their states change in place."""
    for block, state in zip(blocks, states):
        x = block.step(x, state)
    return x


class _StageStep(nn.Module):
    """``_step`` over one stage as an exportable module: the blocks' SSM snapshots are registered as
    buffers (weights to the compiler) and their states are plain inputs that the step updates in place."""

    def __init__(self, blocks: nn.ModuleList, states: list):
        super().__init__()
        self.blocks = blocks
        self.recurrences = [None if state is None else state[1] for state in states]
        for i, rec in enumerate(self.recurrences):
            for f in dataclasses.fields(rec) if rec is not None else ():
                self.register_buffer(f"recurrence{i}_{f.name}", getattr(rec, f.name), persistent=False)

    def forward(self, x: Tensor, *states: Tensor) -> Tensor:
        pending = iter(states)
        return _step(self.blocks, x, [None if rec is None else (next(pending), rec) for rec in self.recurrences])


def _compiled_stage(blocks: nn.ModuleList, states: list) -> Callable[[Tensor], Tensor]:
    """The stage's step compiled ahead of time for these states' batch size; same contract as ``_step``."""
    tensors = [state[0] for state in states if state is not None]
    norm = blocks[0].norm
    x = norm.weight.new_zeros(tensors[0].shape[1], *norm.normalized_shape)  # states are [2, b, h, n]
    compiled = compile_ahead_of_time(_StageStep(blocks, states), (x, *tensors))
    return lambda h: compiled(h, *tensors)


@dataclass
class SashimiState:
    """Recurrent state: the step count, per-block layer states, DownPool inputs and UpPool outputs."""

    t: int
    blocks: dict[str, list]
    down_buffer: list[Tensor]  # [b, p, h] per stage: the inputs of the current coarse step
    up_pending: list[Tensor]  # [b, p, h] per stage: outputs for the current coarse step
    stages: dict[str, Callable[[Tensor], Tensor]]  # one sample through a stage's blocks: x [b, h] → [b, h]

    @torch.inference_mode()
    def reset(self) -> SashimiState:
        """Back to the zero state in place, keeping the (possibly compiled) stages for another run."""
        self.t = 0
        tensors = [s[0] for states in self.blocks.values() for s in states if s is not None]
        for tensor in tensors + self.down_buffer + self.up_pending:
            tensor.zero_()
        return self


def _run(blocks: nn.ModuleList, x: Tensor) -> Tensor:
    for block in blocks:
        x = block(x)
    return x


class SaShiMi(nn.Module):
    """The SaShiMi backbone over ``levels`` tokens; outputs ``out_features`` per step for the head."""

    block_classes = (ResidualBlock,)
    fp32_classes = (DiagKernel, DPLRKernel)  # SSM kernels: parameters and computation stay float32

    def __init__(self, *, levels: int, out_features: int, d_model: int = 64, n_layers: int = 8,
                 pool: tuple[int, ...] = (4, 4), expand: int = 2, ff: int = 2, glu: bool = False,
                 unet: bool = False, dropout: float = 0.0, ssm: SSMOptions | None = None,
                 ssm_lr: float = 1e-3):
        super().__init__()
        ssm = ssm or SSMOptions()
        self.pool = tuple(pool)
        self.ssm_lr = ssm_lr
        self.embedding = nn.Embedding(levels, d_model)

        def stage_blocks(h: int, l_max: int) -> nn.ModuleList:
            opts = dataclasses.replace(ssm, l_max=l_max)
            blocks = []
            for _ in range(n_layers):
                blocks.append(ResidualBlock(S4Layer(h, opts, glu=glu, dropout=dropout), h, dropout))
                blocks.append(ResidualBlock(FeedForward(h, ff, dropout), h, dropout))
            return nn.ModuleList(blocks)

        self.widths = [d_model * expand**i for i in range(len(self.pool) + 1)]
        l_maxes = [math.ceil(ssm.l_max / math.prod(self.pool[:i])) for i in range(len(self.pool) + 1)]
        self.down_blocks = nn.ModuleList(
            stage_blocks(self.widths[i], l_maxes[i]) if unet else nn.ModuleList() for i in range(len(self.pool)))
        self.down_pools = nn.ModuleList(DownPool(self.widths[i], expand, p) for i, p in enumerate(self.pool))
        self.center = stage_blocks(self.widths[-1], l_maxes[-1])
        self.up_pools = nn.ModuleList(UpPool(self.widths[i], expand, p) for i, p in enumerate(self.pool))
        self.up_blocks = nn.ModuleList(stage_blocks(self.widths[i], l_maxes[i]) for i in range(len(self.pool)))
        self.norm = nn.LayerNorm(d_model)
        self.output = nn.Linear(d_model, out_features)

    def forward(self, x: Tensor) -> Tensor:
        """x: Long[b, l] tokens → [b, l, out]; l is padded internally to a multiple of prod(pool)."""
        length = x.shape[1]
        x = F.pad(x, (0, -length % math.prod(self.pool)))
        h = self.embedding(x)
        skips = []
        for blocks, pool in zip(self.down_blocks, self.down_pools):
            h = _run(blocks, h)
            skips.append(h)
            h = pool(h)
        h = h + _run(self.center, h)
        for level in reversed(range(len(self.pool))):
            h = self.up_pools[level](h) + skips[level]
            h = h + _run(self.up_blocks[level], h)
        return self.output(self.norm(h[:, :length]))

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: matrices decay; biases, norms and D do not; Δ, A, B, P get ``ssm_lr`` and no decay."""
        ssm = {id(p) for m in self.modules() if isinstance(m, S4Layer) for p in m.kernel.ssm_parameters()}
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if id(p) not in ssm and p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in ssm and p.ndim < 2], "weight_decay": 0.0},
            {"params": [p for p in params if id(p) in ssm], "weight_decay": 0.0, "lr": self.ssm_lr},
        ]
        return [g for g in groups if g["params"]]

    # ------------------------------------------------------------------------------------------
    # recurrent mode
    # ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def default_state(self, batch_size: int, *, compiled: bool = False) -> SashimiState:
        """Zero state for ``batch_size`` sequences; it snapshots the discretised SSMs of the current weights.

        ``compiled`` compiles each stage's step ahead of time (``compile_ahead_of_time``): equal to
        float rounding and several times faster per sample, after tens of seconds of compiling per stage.
        """
        ref = self.output.weight
        groups = {f"down{i}": b for i, b in enumerate(self.down_blocks)}
        groups |= {"center": self.center} | {f"up{i}": b for i, b in enumerate(self.up_blocks)}
        blocks = {k: [blk.default_state(batch_size) for blk in v] for k, v in groups.items()}
        stages = {k: _compiled_stage(v, blocks[k]) if compiled and len(v)
                  else functools.partial(_step, v, states=blocks[k]) for k, v in groups.items()}
        return SashimiState(
            t=0,
            blocks=blocks,
            down_buffer=[ref.new_zeros(batch_size, p, self.widths[i]) for i, p in enumerate(self.pool)],
            up_pending=[ref.new_zeros(batch_size, p, self.widths[i]) for i, p in enumerate(self.pool)],
            stages=stages,
        )

    @torch.inference_mode()
    def step(self, x: Tensor, state: SashimiState) -> tuple[Tensor, SashimiState]:
        """One sample: tokens Long[b] → [b, out]. Equal to ``forward`` at the same position.

        Runs in inference mode (no autograd bookkeeping) and updates ``state`` in place.
        """
        h = self._step_level(0, self.embedding(x), state)
        state.t += 1
        return self.output(self.norm(h)), state

    def _step_level(self, level: int, h: Tensor, state: SashimiState) -> Tensor:
        if level == len(self.pool):
            return h + state.stages["center"](h)
        p = self.pool[level]
        phase = state.t // math.prod(self.pool[:level]) % p
        h = state.stages[f"down{level}"](h)
        state.down_buffer[level][:, phase] = h
        h = state.up_pending[level][:, phase] + h  # read before the queue below is refilled
        if phase == p - 1:  # the coarse step is complete: run the inner stages, queue its outputs
            buffer = state.down_buffer[level]
            coarse = self.down_pools[level].linear(buffer.reshape(buffer.shape[0], -1))
            inner = self._step_level(level + 1, coarse, state)
            # in place: every state tensor keeps its storage, so a CUDA graph of a step replays correctly
            state.up_pending[level].copy_(self.up_pools[level].linear(inner).view(buffer.shape))
        return h + state.stages[f"up{level}"](h)
