"""A small token model with residual blocks, as a planner workload that needs no audio model."""

from __future__ import annotations

import torch
from torch import nn

from dist_audio.plan import Workload
from dist_audio.train.parallelize import apply_activation_checkpointing


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class Toy(nn.Module):
    block_classes = (Block,)

    def __init__(self, width: int = 64, depth: int = 4, levels: int = 256):
        super().__init__()
        self.embed = nn.Embedding(levels, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def toy_workload(width: int = 64, depth: int = 4) -> Workload:
    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        logits = model(batch["x"])
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["y"].flatten())

    def make_batch(batch_size: int, length: int) -> dict:
        y = torch.randint(0, 256, (batch_size, length))
        return {"x": y, "y": y}

    return Workload(build_model=lambda: Toy(width, depth), make_batch=make_batch, loss=loss,
                    param_groups=lambda model: [{"params": list(model.parameters())}],
                    apply_checkpointing=apply_activation_checkpointing, block_classes=(Block,))
