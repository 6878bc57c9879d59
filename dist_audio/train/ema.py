"""Exponential moving average of the weights that lives where the parameters live.

Each rank keeps the fp32 average of only the parameter elements it holds: the whole tensor under
DDP / ZeRO-1/2, its FSDP2 ``DTensor`` shard, or its DeepSpeed ZeRO-3 partition (``param.ds_tensor``).
Updating is elementwise and needs no communication. In checkpoints the EMA is part of the portable
state (``portable_state``: ``ema/<name>`` entries, sharded along dim 0), so it resumes under any
strategy and world size and exports without a GPU. Gathering it runs on ``comm_device``, also for
shadows that live on the CPU (offloaded ZeRO-3 partitions, FSDP2 CPU shards), so it works over NCCL.

Under DeepSpeed bf16 the average is taken of the bf16 working weights (the fp32 master copy is
partitioned differently, inside the optimizer), so it carries their rounding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dist_audio.train.parallelize import plain_name, unwrap_model
from dist_audio.train.portable_state import gather_full, shard_rows

__all__ = ["ShardedEMA"]


class ShardedEMA:
    """``ema = decay * ema + (1 - decay) * param`` after every optimizer step, per held shard.

    Build it from the model returned by ``setup_model_and_optimizer`` (its parameters are already
    sharded); that model is kept for ``portable`` / ``load_portable`` / ``full_weights``.
    """

    def __init__(self, model: nn.Module, decay: float, comm_device: torch.device):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.model, self.decay, self.comm_device = model, decay, comm_device
        self.shadow = {name: _held(param).detach().float().clone() for name, param in _named_parameters(model)}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, param in _named_parameters(model):
            self.shadow[name].lerp_(_held(param).detach().float(), 1.0 - self.decay)

    def portable(self) -> dict[str, Tensor]:
        """The shadows as portable entries: the live tensors (plain or DTensor), or for ZeRO-3 partitions
        the regathered tensor cut into dim-0 shards (collective)."""
        return {name: shard_rows(self._gather_partition(param, self.shadow[name]), self.comm_device)
                if hasattr(param, "ds_tensor") else self.shadow[name]
                for name, param in _named_parameters(self.model)}

    def load_portable(self, entries: dict[str, Tensor]) -> None:
        """Take back what ``portable`` gave after it was loaded into (live tensors were filled in place)."""
        missing = sorted(set(self.shadow) - set(entries))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[0]}")
        for name, param in _named_parameters(self.model):
            if hasattr(param, "ds_tensor"):
                self.shadow[name].copy_(_partition(param, gather_full(entries[name], self.comm_device)))

    def full_weights(self) -> dict[str, Tensor]:
        """The complete fp32 EMA weights on the CPU of every rank (collective under ZeRO-3 / FSDP2)."""
        return {name: self._gather_partition(param, self.shadow[name]) if hasattr(param, "ds_tensor")
                else gather_full(self.shadow[name], self.comm_device)
                for name, param in _named_parameters(self.model)}

    def _gather_partition(self, param: nn.Parameter, shadow: Tensor) -> Tensor:
        """ZeRO-3: the flat, padded partitions of all ranks, in rank order, as the full tensor."""
        local = shadow.to(self.comm_device).contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        return torch.cat(parts)[: param.ds_numel].view(param.ds_shape).cpu()


def _named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(plain_name(name), p) for name, p in unwrap_model(model).named_parameters() if p.requires_grad]


def _held(param: Tensor) -> Tensor:
    """The elements of ``param`` this rank stores (a DTensor stays a DTensor: its ops are local)."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param


def _partition(param: nn.Parameter, full: Tensor) -> Tensor:
    """This rank's ZeRO-3 partition of a full tensor (flat, zero-padded to equal partitions)."""
    size = param.ds_tensor.numel()
    flat = torch.zeros(size * dist.get_world_size(), dtype=full.dtype)
    flat[: full.numel()] = full.flatten()
    return flat[dist.get_rank() * size:(dist.get_rank() + 1) * size]

