"""ShardedEMA on one process (the sharded cases run in test_strategies.py at 2 processes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_audio.train.ema import ShardedEMA

CPU = torch.device("cpu")


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    model[1].weight.requires_grad_(False)  # frozen parameters are not averaged
    return model


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_update_is_the_exponential_average():
    model = small_model()
    ema = ShardedEMA(model, decay=0.9, comm_device=CPU)
    expected = trainable(model)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        expected = {k: 0.9 * expected[k] + 0.1 * v for k, v in trainable(model).items()}
    weights = ema.full_weights()
    assert set(weights) == set(expected) and "1.weight" not in weights  # frozen: not averaged
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value)


def test_portable_round_trip_into_a_fresh_model():
    model = small_model()
    ema = ShardedEMA(model, decay=0.5, comm_device=CPU)
    with torch.no_grad():
        model[0].weight.mul_(2)
    ema.update(model)
    restored = ShardedEMA(small_model(), decay=0.5, comm_device=CPU)
    entries = {k: v.clone() for k, v in ema.portable().items()}
    for name, value in entries.items():
        restored.shadow[name].copy_(value)  # what DCP does with live tensors: fill them in place
    restored.load_portable(entries)
    for name, value in ema.full_weights().items():
        assert torch.equal(restored.full_weights()[name], value)


def test_rejects_bad_decay_and_incomplete_state():
    with pytest.raises(ValueError, match="decay"):
        ShardedEMA(small_model(), decay=1.0, comm_device=CPU)
    ema = ShardedEMA(small_model(), decay=0.9, comm_device=CPU)
    entries = ema.portable()
    del entries["0.weight"]
    with pytest.raises(KeyError, match="parameters"):
        ema.load_portable(entries)
