"""``make demo``: train the debug SaShiMi and TF-SWA on the demo shards on CPU, then listen to them.

Both models train side by side (one process and one core each) for a few hundred steps through
``launch/train.py``; then ``launch/generate.py`` samples audio from SaShiMi and ``launch/separate.py``
separates a demo test mixture with TF-SWA. It ends by printing where the TensorBoard logs and the
audio files are. Expects ``make demo-data`` to have written ``data/demo/``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "data/demo", help="demo data root (make demo-data)")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs", help="where the two runs are written")
    parser.add_argument("--out", type=Path, default=REPO / "out/demo", help="where the audio is written")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per model")
    return parser.parse_args(argv)


def train_both(args: argparse.Namespace) -> dict[str, Path]:
    """Train both debug models concurrently; returns their run directories."""
    jobs = {"sashimi": args.data / "shards/speech", "tfswa": args.data / "shards/musdb"}
    every = max(1, args.steps // 3)
    processes, runs = {}, {}
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    for model, shards in jobs.items():
        name = f"demo-{model}"
        runs[model] = args.runs_dir / name
        command = [sys.executable, str(REPO / "launch/train.py"), "--config", str(REPO / f"configs/{model}/debug.yaml"),
                   "--set", f"data.shards={shards}", "--set", f"train.runs_dir={args.runs_dir}",
                   "--set", f"train.name={name}", "--set", f"train.max_steps={args.steps}",
                   "--set", f"train.val_every={every}", "--set", f"train.checkpoint_every={every}",
                   "--set", "log.progress_bar=false", "--overwrite"]
        log = (args.runs_dir / f"{name}.log").open("w")
        processes[model] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                             env={**os.environ, "OMP_NUM_THREADS": "1"}), log)
        print(f"training {name}: {args.steps} steps, log {log.name}")
    start = time.monotonic()
    for model, (process, log) in processes.items():
        code = process.wait()
        log.close()
        if code != 0:
            tail = Path(log.name).read_text().splitlines()[-20:]
            sys.exit(f"training {model} failed (exit {code}); last lines of {log.name}:\n" + "\n".join(tail))
        print(f"{model} trained ({time.monotonic() - start:.0f} s since start)")
    return runs


def run(command: list[str]) -> None:
    print("$", " ".join(str(part) for part in command))
    subprocess.run([str(part) for part in command], check=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.data / "shards/speech/manifest.json").is_file():
        sys.exit(f"no demo shards under {args.data}: run `make demo-data` first")
    runs = train_both(args)
    generated, separated = args.out / "generated", args.out / "separated"
    run([sys.executable, REPO / "launch/generate.py", "--checkpoint", runs["sashimi"], "--num", "2",
         "--seconds", "2", "--out", generated])
    mixture = sorted((args.data / "audio/musdb/test").glob("*/mixture.wav"))[0]
    run([sys.executable, REPO / "launch/separate.py", "--checkpoint", runs["tfswa"], "--input", mixture,
         "--out", separated])
    print("\nDone.")
    print(f"  TensorBoard:        tensorboard --logdir {args.runs_dir}")
    print(f"  checkpoints:        {runs['sashimi']}/checkpoints, {runs['tfswa']}/checkpoints")
    print(f"  generated speech:   {generated}/  (SaShiMi, 2 clips of 2 s)")
    print(f"  separated stems:    {separated}/  (TF-SWA on {mixture})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
