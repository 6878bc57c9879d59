"""Activation checkpointing of the models' blocks: same gradients, far less activation memory.

Activation memory is what the forward pass leaves alive for the backward pass, measured with
``torch.distributed._tools.mem_tracker.MemTracker`` (which tracks CPU tensors too) right after the
forward, minus the model output itself.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

from dist_audio.config import load_config
from dist_audio.models import build_model
from dist_audio.objectives import build_objective
from dist_audio.train.parallelize import apply_activation_checkpointing, block_modules, plain_name

ROOT = Path(__file__).resolve().parents[2]


def debug_setup(name: str, *overrides: str):
    cfg = load_config(ROOT / "configs" / name / "debug.yaml", ["data.shards=unused", *overrides])
    torch.manual_seed(0)
    return cfg, build_model(cfg.model), build_objective(cfg.model, cfg.data)


def batch_for(cfg, length: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    if cfg.model.name == "sashimi":
        levels = 2 ** cfg.model.bits
        y = torch.randint(0, levels, (2, length), generator=gen)
        return {"x": torch.cat([torch.full((2, 1), levels // 2), y[:, :-1]], dim=1), "y": y}
    stems = 0.3 * torch.randn(2, len(cfg.model.sources), cfg.model.channels, length, generator=gen)
    return {"mixture": stems.sum(1), "stems": stems}


def held_activation_bytes(model: torch.nn.Module, inputs: torch.Tensor) -> int:
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        out = model(inputs)
        held = tracker.get_tracker_snapshot()[inputs.device][_MemRefType.ACT]
        out.sum().backward()
    return held - out.numel() * out.element_size()


# SaShiMi's one-layer debug model spends half its activations outside the blocks (embedding, pooling,
# the 256-way output); with two layers per stage, as in every real config, the blocks dominate.
MODELS = [pytest.param("sashimi", ["model.n_layers=2"], 16384, id="sashimi"),
          pytest.param("tfswa", [], 32768, id="tfswa")]


@pytest.mark.parametrize(("name", "overrides", "length"), MODELS)
def test_checkpointing_halves_activation_memory(name: str, overrides: list[str], length: int):
    cfg, model, _ = debug_setup(name, *overrides)
    checkpointed = copy.deepcopy(model)
    assert apply_activation_checkpointing(checkpointed, "blocks") == len(block_modules(model))
    key = "x" if name == "sashimi" else "mixture"
    inputs = batch_for(cfg, length)[key]
    plain, reduced = held_activation_bytes(model, inputs), held_activation_bytes(checkpointed, inputs)
    assert plain >= 2 * reduced, f"{plain / 2**20:.1f} MiB -> {reduced / 2**20:.1f} MiB"


@pytest.mark.parametrize("name", ["sashimi", "tfswa"])
@pytest.mark.parametrize("mode", ["blocks", "every_n"])
def test_checkpointing_keeps_gradients(name: str, mode: str):
    cfg, model, objective = debug_setup(name)
    checkpointed = copy.deepcopy(model)
    apply_activation_checkpointing(checkpointed, mode, every_n=2)
    batch = batch_for(cfg, 4096)
    for m in (model, checkpointed):
        loss, _ = objective.loss(m, batch)
        loss.backward()
    grads = {plain_name(n): p for n, p in checkpointed.named_parameters()}
    for param_name, param in model.named_parameters():
        torch.testing.assert_close(grads[param_name].grad, param.grad, rtol=1e-6, atol=1e-8, msg=param_name)


def test_modes_count_and_names_stay():
    _, model, _ = debug_setup("tfswa")
    n_blocks = len(block_modules(model))
    keys = list(model.state_dict())
    groups = [len(g["params"]) for g in model.param_groups(0.1)]
    assert apply_activation_checkpointing(copy.deepcopy(model), "none") == 0
    assert apply_activation_checkpointing(copy.deepcopy(model), "every_n", every_n=3) == math.ceil(n_blocks / 3)
    assert apply_activation_checkpointing(model, "blocks") == n_blocks
    assert apply_activation_checkpointing(model, "blocks") == 0  # already wrapped: nothing twice
    assert list(model.state_dict()) == keys  # checkpoints and exports stay loadable into a plain model
    assert [len(g["params"]) for g in model.param_groups(0.1)] == groups
    with pytest.raises(ValueError, match=r"none\|blocks\|every_n"):
        apply_activation_checkpointing(model, "layers")
