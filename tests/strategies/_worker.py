"""A few optimizer steps of a debug model under whatever strategy ``accelerate launch`` set up.

Independent of the training loop: fixed synthetic batches (the same global batch on every run, each
rank taking its contiguous slice), AdamW over the model's parameter groups, fp32, no clipping.
Writes ``OUT/rank<r>.json`` (per-step mean loss over the global batch, gradient norm as
``accelerator.clip_grad_norm_`` reports it, StrategyInfo, EMA checksums).
With ``--save-at K`` it writes a real checkpoint (``dist_audio.train.checkpoint``) into ``OUT/run``
after step K, reloads it and goes on; rank 0 also stores the gathered weights and EMA at that point
(``OUT/at_save.safetensors``, ``OUT/ema_at_save.safetensors``) for the export tests.

    accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes 2 \\
        tests/strategies/_worker.py --model sashimi --out /tmp/zero2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from dist_audio.config import load_config
from dist_audio.models import build_model
from dist_audio.objectives import build_objective
from dist_audio.process_exit import exit_without_teardown
from dist_audio.train.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from dist_audio.train.ema import ShardedEMA
from dist_audio.train.parallelize import (
    LaunchStrategy,
    clip_grad_norm,
    make_accelerator,
    setup_model_and_optimizer,
    state_holder,
)

ROOT = Path(__file__).resolve().parents[2]


def synthetic_batches(cfg, global_batch: int, length: int, steps: int) -> list[dict[str, torch.Tensor]]:
    """Fixed random batches shaped like the data loader's for the model's task."""
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(steps):
        if cfg.model.name == "sashimi":
            levels = 2 ** cfg.model.bits
            y = torch.randint(0, levels, (global_batch, length), generator=gen)
            x = torch.cat([torch.full((global_batch, 1), levels // 2), y[:, :-1]], dim=1)
            batches.append({"x": x, "y": y})
        else:
            shape = (global_batch, len(cfg.model.sources), cfg.model.channels, length)
            stems = 0.3 * torch.randn(shape, generator=gen)
            batches.append({"mixture": stems.sum(1), "stems": stems})
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sashimi", help="config folder holding debug.yaml: sashimi | tfswa")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps")
    parser.add_argument("--global-batch", type=int, default=4, help="samples per step over all ranks")
    parser.add_argument("--length", type=int, default=2048, help="audio samples per example")
    parser.add_argument("--ac", default="none", help="activation checkpointing: none|blocks|every_n")
    parser.add_argument("--ema", type=float, default=0.0, help="EMA decay; 0 = no EMA")
    parser.add_argument("--save-at", type=int, default=0, help="checkpoint after this step, reload, go on")
    parser.add_argument("--precision", default="no", help="train.mixed_precision: no | bf16")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(ROOT / "configs" / args.model / "debug.yaml",
                      ["data.shards=unused", f"train.runs_dir={out}", "train.name=run", "optim.grad_clip=0",
                       f"train.activation_checkpointing={args.ac}", f"train.mixed_precision={args.precision}"])
    torch.manual_seed(0)
    model, objective = build_model(cfg.model), build_objective(cfg.model, cfg.data)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} does not split over {world} ranks")
    per_rank = args.global_batch // world
    strategy = LaunchStrategy.from_environment()
    accelerator = make_accelerator(cfg.train, strategy, per_rank, grad_clip=0.0)
    rank = accelerator.process_index

    def make_optimizer(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(m.param_groups(0.01), lr=3e-3)

    model, optimizer, info = setup_model_and_optimizer(accelerator, strategy, model, make_optimizer, cfg.train)
    ema = ShardedEMA(model, args.ema, accelerator.device) if args.ema else None
    holder = state_holder(accelerator, model, optimizer, ema)
    losses, grad_norms = [], []
    for step, batch in enumerate(synthetic_batches(cfg, args.global_batch, args.length, args.steps), start=1):
        local = {k: v[rank * per_rank:(rank + 1) * per_rank].to(accelerator.device) for k, v in batch.items()}
        loss, _ = objective.loss(model, local)
        accelerator.backward(loss)
        grad_norms.append(clip_grad_norm(accelerator, model, 1e6))  # reports, never clips
        optimizer.step()
        optimizer.zero_grad()
        if ema:
            ema.update(model)
        losses.append(accelerator.reduce(loss.detach(), "mean").item())
        if step == args.save_at:
            state = TrainerState(step=step, samples_seen=step * args.global_batch)
            path = save_checkpoint(accelerator, cfg.run_dir, cfg, state, holder, keep_last=2)
            weights = holder.full_weights(accelerator.device)
            ema_weights = ema.full_weights() if ema else None
            if rank == 0:
                save_file(weights, str(out / "at_save.safetensors"))
                if ema_weights:
                    save_file(ema_weights, str(out / "ema_at_save.safetensors"))
            load_checkpoint(accelerator, path, holder)
    result = {"losses": losses, "grad_norms": grad_norms, "info": dataclasses.asdict(info)}
    if ema:
        result["ema"] = {name: w.double().sum().item() for name, w in ema.full_weights().items()}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    accelerator.end_training()


if __name__ == "__main__":
    main()
    exit_without_teardown(0)  # a gloo thread finishing a collective must not abort a finished rank
