"""Optimizer groups, learning-rate schedules and batch splitting (unit level, no training)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dist_audio.config import OptimConfig
from dist_audio.train.auto_fit import AutoFit, split_batch
from dist_audio.train.optim import LRSchedule, make_optimizer


class TwoGroups(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.ssm = nn.Linear(3, 3), nn.Linear(3, 1)

    def param_groups(self, weight_decay):
        return [{"params": list(self.body.parameters()), "weight_decay": weight_decay},
                {"params": list(self.ssm.parameters()), "lr": 1e-4, "weight_decay": 0.0}]


def lrs(optimizer):
    return [group["lr"] for group in optimizer.param_groups]


def test_groups_keep_their_own_lr_and_weight_decay():
    optimizer = make_optimizer(TwoGroups(), OptimConfig(lr=1e-2, weight_decay=0.1))
    assert lrs(optimizer) == [1e-2, 1e-4]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_warmup_then_cosine_scales_every_group_alike():
    cfg = OptimConfig(lr=1e-2, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    optimizer = make_optimizer(TwoGroups(), cfg)
    schedule = LRSchedule(optimizer, cfg, max_steps=14)
    seen = []
    for _ in range(14):
        seen.append(lrs(optimizer))
        schedule.step()
    assert seen[0] == pytest.approx([1e-2 / 4, 1e-4 / 4])
    assert seen[3] == pytest.approx([1e-2, 1e-4])
    assert seen[9] == pytest.approx([1e-2 * 0.55, 1e-4 * 0.55])  # half-way down the cosine to 10 %
    assert lrs(optimizer) == pytest.approx([1e-3, 1e-5])
    assert all(a[0] / a[1] == pytest.approx(100) for a in seen)


def test_plateau_cuts_after_patience_and_state_round_trips():
    cfg = OptimConfig(lr=1.0, schedule="plateau", plateau_patience=2, plateau_factor=0.5)
    optimizer = make_optimizer(TwoGroups(), cfg)
    schedule = LRSchedule(optimizer, cfg, max_steps=100)
    for loss in (3.0, 2.0, 2.5, 2.1):
        schedule.report_validation(loss)
    assert lrs(optimizer) == pytest.approx([0.5, 5e-5])
    restored = LRSchedule(make_optimizer(TwoGroups(), cfg), cfg, max_steps=100)
    restored.load_state_dict(schedule.state_dict())
    assert lrs(restored.optimizer) == lrs(optimizer) and restored.best_loss == 2.0


def test_split_batch_keeps_samples_in_order_and_counts_once():
    batch = {"x": torch.arange(10).reshape(5, 2), "keys": list("abcde"), "skipped": torch.tensor(3)}
    pieces = split_batch(batch, 2)
    assert [p["keys"] for p in pieces] == [list("abc"), list("de")]
    assert torch.equal(torch.cat([p["x"] for p in pieces]), batch["x"])
    assert sum(int(p["skipped"]) for p in pieces) == 3
    weights = [w for _, w in AutoFit(True, splits=2).micro_batches([batch, batch])]
    assert weights == pytest.approx([0.3, 0.2, 0.3, 0.2]) and math.isclose(sum(weights), 1.0)
