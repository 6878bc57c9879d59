"""Exponential moving average of the weights that lives where the parameters live.

Each rank keeps the fp32 average of only the parameter elements it holds: the whole tensor under
DDP / ZeRO-2, its FSDP2 ``DTensor`` shard, or its DeepSpeed ZeRO-3 partition (``param.ds_tensor``).
Updating is elementwise and needs no communication. ``state_dict()`` gathers the full fp32 weights
(a collective: call it on every rank), so the EMA can be registered with
``accelerator.register_for_checkpointing`` and is stored consolidated, ready for export.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dist_audio.train.parallelize import plain_name

__all__ = ["ShardedEMA", "gather_parameters"]


class ShardedEMA:
    """``ema = decay * ema + (1 - decay) * param`` after every optimizer step, per held shard.

    Build it from the model returned by ``setup_model_and_optimizer`` (its parameters are already
    sharded); that model is kept for ``state_dict`` / ``load_state_dict``.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.model = model
        self.decay = decay
        self.num_updates = 0
        self.shadow = {name: _held(param).detach().float().clone()
                       for name, param in _named_parameters(model)}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, param in _named_parameters(model):
            self.shadow[name].lerp_(_held(param).detach().float(), 1.0 - self.decay)
        self.num_updates += 1

    def full_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The complete fp32 EMA weights on CPU, with frozen parameters and persistent buffers as
        they are: a state dict for the plain model (collective under ZeRO-3 / FSDP)."""
        weights = {name: _gather(param, self.shadow[name]) for name, param in _named_parameters(model)}
        frozen = {plain_name(name): _gather(param, _held(param).detach().float())
                  for name, param in _unwrap(model).named_parameters() if not param.requires_grad}
        return weights | frozen | _persistent_buffers(model)

    def state_dict(self) -> dict:
        """Consolidated state: ``decay``, ``num_updates`` and full fp32 ``weights`` (collective)."""
        return {"decay": self.decay, "num_updates": self.num_updates, "weights": self.full_weights(self.model)}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()`` output; each rank keeps its own slice (collective under FSDP2)."""
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        weights = state["weights"]
        missing = sorted(set(self.shadow) - set(weights))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[0]}")
        for name, param in _named_parameters(self.model):
            self.shadow[name].copy_(_local_slice(param, weights[name].float()))


def gather_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full trainable parameters as fp32 CPU tensors, under any strategy (collective)."""
    return {name: _gather(param, _held(param).detach().float()) for name, param in _named_parameters(model)}


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DeepSpeed engine wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _named_parameters(model: nn.Module):
    return [(plain_name(name), p) for name, p in _unwrap(model).named_parameters() if p.requires_grad]


def _persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that belong in a state dict (replicated on every rank under all strategies)."""
    inner = _unwrap(model)
    keys = {plain_name(k) for k in inner.state_dict(keep_vars=True)}
    return {plain_name(name): b.detach().float().cpu().clone() if b.is_floating_point() else b.detach().cpu().clone()
            for name, b in inner.named_buffers() if plain_name(name) in keys}


def _held(param: torch.Tensor) -> torch.Tensor:
    """The elements of ``param`` this rank stores (a DTensor stays a DTensor: its ops are local)."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor
    return param


def _gather(param: torch.Tensor, shadow: torch.Tensor) -> torch.Tensor:
    if hasattr(shadow, "full_tensor"):  # FSDP2 DTensor
        return shadow.full_tensor().cpu()
    if hasattr(param, "ds_tensor"):  # ZeRO-3: flat, padded partitions in rank order
        parts = [torch.empty_like(shadow) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, shadow.contiguous())
        return torch.cat(parts)[: param.ds_numel].view(param.ds_shape).cpu()
    return shadow.detach().cpu().clone()


def _local_slice(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of a full tensor, laid out like the shadow of ``param``."""
    if hasattr(param, "device_mesh"):  # FSDP2 DTensor
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(param.to_local().device), param.device_mesh, param.placements)
    if hasattr(param, "ds_tensor"):
        size = param.ds_tensor.numel()
        flat = torch.zeros(size * dist.get_world_size(), dtype=full.dtype)
        flat[: full.numel()] = full.flatten()
        return flat[dist.get_rank() * size:(dist.get_rank() + 1) * size]
    return full
