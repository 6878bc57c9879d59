"""Evaluate a trained model on a shard split: SDR per stem for a separator, bits per sample for SaShiMi.

    python launch/evaluate.py --checkpoint runs/tfswa-musdb --data data/musdb18/shards --split valid --json

``--checkpoint`` takes an export directory, a checkpoint directory or a run directory. The split is
read as the trainer's validation reads it (every crop of ``data.segment_seconds`` once, padding rows
masked out) and the objective's per-sample metrics are averaged over the crops. Separation reports
uSDR (dB) per stem and their average; SaShiMi reports the loss in nats and in bits per sample.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_audio.config import ConfigError
from dist_audio.data import make_loader
from dist_audio.data.manifest import check_data_compatible
from dist_audio.inference import load_model
from dist_audio.metrics import bits_per_sample
from dist_audio.objectives import build_objective


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="export, checkpoint or run directory")
    parser.add_argument("--data", required=True,
                        help="shard directory or URL (s3://, gs://, http(s)://) made by data_prep.shard")
    parser.add_argument("--split", default="valid", choices=["train", "valid"], help="split to read")
    parser.add_argument("--batch-size", type=int, help="crops per batch (default: the run's data.batch_size)")
    parser.add_argument("--segment-seconds", type=float, help="crop length (default: the run's)")
    parser.add_argument("--max-batches", type=int, default=0, help="stop after this many batches; 0 = all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser.parse_args(argv)


def evaluate(model, objective, loader, device: str | torch.device, max_batches: int = 0) -> dict[str, float]:
    """Mean of every per-sample metric over the real (unmasked) samples, plus ``samples``."""
    totals: dict[str, float] = {}
    count = 0
    for index, batch in enumerate(loader):
        if max_batches and index >= max_batches:
            break
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        keep = batch.get("mask", torch.ones(len(batch["keys"]), dtype=torch.bool, device=device))
        if not keep.any():
            continue
        with torch.no_grad():
            metrics = objective.evaluate(model, batch)
        for name, values in metrics.items():
            totals[name] = totals.get(name, 0.0) + float(values[keep].double().sum())
        count += int(keep.sum())
    if count == 0:
        raise ValueError("the split holds no readable samples")
    results = {name: total / count for name, total in totals.items()}
    if "sdr/avg" not in results and "bits_per_sample" not in results:
        results["bits_per_sample"] = bits_per_sample(results["loss"])
    results["samples"] = count
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, cfg = load_model(args.checkpoint, args.device)
    overrides = {"shards": args.data}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if args.segment_seconds:
        overrides["segment_seconds"] = args.segment_seconds
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **overrides))
    try:
        cfg.validate()
        manifest = check_data_compatible(cfg)
        rate = getattr(cfg.model, "sample_rate", manifest["sample_rate"])
        if manifest["sample_rate"] != rate:
            raise ConfigError("data.shards", f"the shards are at {manifest['sample_rate']} Hz, the model at {rate} Hz")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    objective = build_objective(cfg.model, cfg.data)
    loader = make_loader(cfg.data, args.split)
    results = evaluate(model, objective, loader, args.device, args.max_batches)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name, value in results.items():
            print(f"{name:>24s}  {value:.4f}" if isinstance(value, float) else f"{name:>24s}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
