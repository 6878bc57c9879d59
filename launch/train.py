"""Train a model: ``accelerate launch [--config_file configs/accelerate/<strategy>.yaml] launch/train.py
--config configs/<model>/<size>.yaml [--set key=value ...] [--resume auto] [--overwrite] [--test-mode]``.

Exit codes: 0 done (or stopped cleanly by SIGTERM/SIGINT after a checkpoint), 1 training failed (the
reason in one message), 2 user error in the config, the launch strategy or the run directory (one line,
no traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from dist_audio.config import ConfigError, load_config
from dist_audio.data import CorruptDataError
from dist_audio.process_exit import exit_without_teardown
from dist_audio.storage import SourceUnavailable
from dist_audio.train.auto_fit import AutoFitExhausted
from dist_audio.train.checkpoint import CheckpointError, check_run_dir, latest_checkpoint
from dist_audio.train.parallelize import StrategyError, check_precision_supported
from dist_audio.train.resume import check_resume
from dist_audio.train.trainer import STOP_SIGNALS, TrainingError, run_test_mode, run_training


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="run config YAML (configs/sashimi/*.yaml, configs/tfswa/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set optim.lr=3e-4 (repeatable)")
    parser.add_argument("--resume", choices=["auto"],
                        help="continue from the newest complete checkpoint of the run, on any number of processes "
                             "and under any strategy")
    parser.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                        help="with --resume: accept a change of KEY that alters what the run computes "
                             "(e.g. data.batch_size); repeatable")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run directory and start over")
    parser.add_argument("--check", action="store_true",
                        help="only validate the config, its shards and the run directory, then exit 0 or 2 "
                             "(run it before `accelerate launch` to fail before any worker starts)")
    parser.add_argument("--test-mode", action="store_true",
                        help="a few steps, one validation, one checkpoint and one resume in <name>-test-mode/")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    speaks = os.environ.get("LOCAL_RANK", "0") == "0"  # one message per machine, not one per process
    is_main = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint messages
    try:
        cfg = load_config(args.config, args.set, check_data=True)
        check_precision_supported(cfg.train)
        cfg.log.check_installed()
        resume = args.resume == "auto" and not args.test_mode
        if not args.test_mode:
            check_run_dir(cfg.run_dir, resume=resume, overwrite=args.overwrite)
        checkpoint = latest_checkpoint(cfg.run_dir) if resume and not args.overwrite else None
        changes = check_resume(checkpoint, cfg, args.allow_change) if checkpoint else []
    except ConfigError as err:
        if speaks:
            print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        if speaks:
            print(f"config OK: {args.config} -> run directory {cfg.run_dir}")
        return 0
    try:
        if args.test_mode:
            run_test_mode(cfg)
        else:
            run_training(cfg, resume=resume, overwrite=args.overwrite, changes=changes)
    except (ConfigError, StrategyError) as err:
        if speaks:
            print(f"error: {err}", file=sys.stderr)
        return 2
    except (TrainingError, CheckpointError, CorruptDataError, SourceUnavailable, AutoFitExhausted) as err:
        if speaks:
            print(f"training failed: {err}", file=sys.stderr)
        return 1
    return 0


def exit_process(code: int) -> None:
    """Exit with ``code``, ignoring stop signals from here on: a late repeat of the one that stopped the
    run (sent directly and by the launcher) must not kill the process after the trainer's handlers are
    gone (SIGKILL still ends it). No interpreter teardown follows (``exit_without_teardown``)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    exit_without_teardown(code)


if __name__ == "__main__":
    exit_process(main())
