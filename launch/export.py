"""Export trained weights for inference: ``python launch/export.py RUN_OR_CHECKPOINT OUT_DIR``.

RUN_OR_CHECKPOINT is a checkpoint directory (``runs/<name>/checkpoints/step-<N>/``) or a run directory
(its newest complete checkpoint), written under any strategy (single device, DDP, DeepSpeed ZeRO-2/3,
FSDP2). OUT_DIR receives ``model.safetensors`` (fp32, the EMA weights when the run kept an EMA) and
``config.yaml``; ``--checkpoint OUT_DIR`` of generate.py / separate.py / evaluate.py loads it on one device.
Runs on one process, no GPU needed. Exit code 2 when the input is not a checkpoint or run directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import save_file

from dist_audio.config import save_config
from dist_audio.models import build_model
from dist_audio.train.consolidate import consolidated_weights, resolve_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="checkpoint directory or run directory")
    parser.add_argument("out_dir", help="directory to write model.safetensors and config.yaml into")
    parser.add_argument("--no-ema", action="store_true", help="export the trained weights even if an EMA exists")
    args = parser.parse_args(argv)
    try:
        checkpoint = resolve_checkpoint(args.source)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    weights, cfg, source = consolidated_weights(checkpoint, prefer_ema=not args.no_ema)
    build_model(cfg.model).load_state_dict(weights)  # fail here, not at inference, on a mismatch
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"), metadata={"source": str(checkpoint), "weights": source})
    save_config(cfg, out / "config.yaml")
    total = sum(t.numel() for t in weights.values())
    print(f"exported {total:,} parameters ({source} weights) from {checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
