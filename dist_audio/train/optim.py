"""AdamW over the model's own parameter groups, and the learning-rate schedule.

The schedule is one multiplier applied to every group's *own* base learning rate, so groups that
carry a smaller lr (SaShiMi's state-space parameters) keep their ratio to the rest through warmup
and decay. It is a plain object with ``state_dict``/``load_state_dict`` so checkpoints carry it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dist_audio.config import OptimConfig


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``model.param_groups(weight_decay)``; a group's own ``lr`` is kept, others get ``cfg.lr``."""
    groups = [dict(g) for g in model.param_groups(cfg.weight_decay)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


class LRSchedule:
    """Warmup, then ``cosine`` decay to ``min_lr_ratio``, ``constant``, or ``plateau`` (cut by
    ``plateau_factor`` after ``plateau_patience`` validations without a new best loss)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
        self.optimizer = optimizer
        self.cfg = cfg
        self.max_steps = max_steps
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.step_count = 0
        self.plateau_scale = 1.0
        self.best_loss = math.inf
        self.bad_validations = 0
        self._apply()

    def factor(self, step: int) -> float:
        """The multiplier on each group's base lr for optimizer step ``step`` (0-based)."""
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            span = max(1, self.max_steps - cfg.warmup_steps)
            progress = min(1.0, (step - cfg.warmup_steps) / span)
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.schedule == "plateau":
            return self.plateau_scale
        return 1.0

    def step(self) -> None:
        """Advance by one optimizer step (call after ``optimizer.step()``)."""
        self.step_count += 1
        self._apply()

    def report_validation(self, loss: float) -> None:
        """Feed a validation loss to the plateau rule (ignored by the other schedules)."""
        if self.cfg.schedule != "plateau":
            return
        if loss < self.best_loss:
            self.best_loss, self.bad_validations = loss, 0
            return
        self.bad_validations += 1
        if self.bad_validations >= self.cfg.plateau_patience:
            self.plateau_scale *= self.cfg.plateau_factor
            self.bad_validations = 0
            self._apply()

    def last_lr(self) -> float:
        """The lr of the first group (the model's main group), for logging."""
        return self.optimizer.param_groups[0]["lr"]

    def _apply(self) -> None:
        factor = self.factor(self.step_count)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "plateau_scale": self.plateau_scale,
                "best_loss": self.best_loss, "bad_validations": self.bad_validations,
                "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.plateau_scale = float(state["plateau_scale"])
        self.best_loss = float(state["best_loss"])
        self.bad_validations = int(state["bad_validations"])
        self.base_lrs = [float(lr) for lr in state["base_lrs"]]
        self._apply()
