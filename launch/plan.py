"""Plan memory before launch: ``python launch/plan.py --config F --gpus N --gpu-memory 24GiB [--nodes 1]
[--margin 0.1] [--set key=value ...] [--json] [--plot FILE.png]``.

Prints, for every strategy × activation checkpointing × precision, the predicted peak per GPU split
into parameters, gradients, optimizer states, activations and temporaries, which fit, the fastest
that fits, the largest micro-batch and segment under it, and the Accelerate config to launch with.
Runs on a machine without a GPU, in seconds: the traces run side by side in one process per core and
are kept on disk (``--no-cache`` to trace afresh). Exit codes: 0 planned, 2 user error (one line).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # fake tensors do no arithmetic; threads only cost start-up

from dist_audio.config import ConfigError, load_config
from dist_audio.plan import check_inputs, format_json, format_text, make_plan, parse_memory, plot
from dist_audio.plan.trace import default_cache_dir
from dist_audio.process_exit import exit_without_teardown


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="run config YAML (configs/sashimi/*.yaml, configs/tfswa/*.yaml)")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    parser.add_argument("--gpu-memory", required=True, help="memory of one GPU, e.g. 24GiB, 80GB, 40960MiB")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    parser.add_argument("--margin", type=float, default=0.1,
                        help="safety margin: a row fits when its peak is below (1 - margin) × GPU memory")
    parser.add_argument("--sample-rate", type=int, default=None,
                        help="audio sample rate in Hz (default: model.sample_rate, else the shards' manifest)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set data.segment_seconds=6 (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the plan as a stacked bar chart")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes tracing side by side (default: one per usable core; 1 = this process)")
    parser.add_argument("--no-cache", action="store_true",
                        help="trace everything afresh; by default traces are kept in $DIST_AUDIO_PLAN_CACHE "
                             "or ~/.cache/dist_audio/plan and reused while the model code is unchanged")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        check_inputs(args.gpus, args.nodes, args.margin)
        try:
            gpu_memory = parse_memory(args.gpu_memory)
        except ValueError as err:
            raise ConfigError("--gpu-memory", str(err)) from None
        if args.sample_rate is not None and args.sample_rate <= 0:
            raise ConfigError("--sample-rate", "must be > 0")
        if args.workers is not None and args.workers < 1:
            raise ConfigError("--workers", "must be >= 1")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plan = make_plan(cfg, gpus=args.gpus, nodes=args.nodes, gpu_memory=gpu_memory, margin=args.margin,
                     sample_rate=args.sample_rate, config_path=args.config, workers=args.workers,
                     cache_dir=None if args.no_cache else default_cache_dir())
    print(format_json(plan) if args.json else format_text(plan))
    if args.plot:
        plot(plan, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())  # freeing the traced models would cost a second
