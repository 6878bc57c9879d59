"""Send SIGTERM from inside the training loop: wraps ``trainer.build_objective`` so that the objective's
``loss`` signals the process on its n-th call. Imported by in-process tests and by subprocess scripts."""

from __future__ import annotations

import os
import signal
import time

from dist_audio.train import trainer


def signal_on_loss_call(call: int, *, times: int = 1, gap: float = 0.0) -> None:
    """Patch the trainer so the ``call``-th loss computation sends itself SIGTERM ``times`` times,
    ``gap`` seconds apart."""
    build = trainer.build_objective

    def build_signalling(model_cfg, data_cfg):
        objective = build(model_cfg, data_cfg)
        loss, calls = objective.loss, []

        def loss_then_signal(model, batch):
            calls.append(1)
            if len(calls) == call:
                for index in range(times):
                    if index:
                        time.sleep(gap)
                    os.kill(os.getpid(), signal.SIGTERM)
                print("survived the signals", flush=True)
            return loss(model, batch)

        objective.loss = loss_then_signal
        return objective

    trainer.build_objective = build_signalling
