"""ShardedEMA on one process (the sharded cases run in test_strategies.py at 2 processes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_audio.train.ema import ShardedEMA, gather_parameters


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    model[1].weight.requires_grad_(False)  # frozen parameters are not averaged
    return model


def test_update_is_the_exponential_average():
    model = small_model()
    start = {k: v.clone() for k, v in gather_parameters(model).items()}
    ema = ShardedEMA(model, decay=0.9)
    expected = dict(start)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        expected = {k: 0.9 * expected[k] + 0.1 * v for k, v in gather_parameters(model).items()}
    weights = ema.full_weights(model)
    assert "1.weight" not in expected and "1.weight" in weights  # frozen: taken as is, like buffers
    assert "1.running_mean" in weights  # persistent buffers come along: a loadable state dict
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value)
    assert ema.num_updates == 3


def test_state_dict_round_trip_and_load_into_plain_model():
    model = small_model()
    ema = ShardedEMA(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.mul_(2)
    ema.update(model)
    restored = ShardedEMA(small_model(), decay=0.99)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.5 and restored.num_updates == 1
    assert all(torch.equal(a, b) for a, b in zip(restored.full_weights(restored.model).values(),
                                                 ema.full_weights(model).values()))
    plain = small_model()
    plain.load_state_dict(ema.full_weights(model))  # strict: every key of a plain model


def test_rejects_bad_decay_and_incomplete_state():
    with pytest.raises(ValueError, match="decay"):
        ShardedEMA(small_model(), decay=1.0)
    ema = ShardedEMA(small_model(), decay=0.9)
    state = ema.state_dict()
    del state["weights"]["0.weight"]
    with pytest.raises(KeyError, match=r"0\.weight"):
        ema.load_state_dict(state)
