"""Separate whole songs into stems with a trained TF-SWA U-Net, one WAV per stem.

    python launch/separate.py --checkpoint runs/tfswa-musdb --input song.flac --out stems/

``--checkpoint`` takes an export directory, a checkpoint directory or a run directory. The song is
resampled to the model's rate, cut into overlapping chunks (only a batch of chunks is on the device
at a time, so any length fits), cross-faded back together and written as ``OUT/<stem>.wav`` at the
song's own sample rate.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import soundfile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_audio.config import TFSWAConfig
from dist_audio.inference import load_model
from dist_audio.separate import separate_track


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="export, checkpoint or run directory")
    parser.add_argument("--input", type=Path, required=True, help="song to separate (any format soundfile reads)")
    parser.add_argument("--out", type=Path, required=True, help="directory for <stem>.wav")
    parser.add_argument("--chunk-seconds", type=float, default=6.0, help="length of each chunk the model sees")
    parser.add_argument("--overlap", type=float, default=0.25, help="fraction of a chunk shared with the next")
    parser.add_argument("--batch", type=int, default=4, help="chunks on the device at a time")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def read_track(path: Path, sample_rate: int, channels: int) -> tuple[torch.Tensor, int]:
    """``[channels, n]`` float audio at ``sample_rate`` and the file's own rate."""
    import torchaudio.functional

    audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    track = torch.from_numpy(audio.T.copy())
    if track.shape[0] != channels:
        track = track.mean(0, keepdim=True).expand(channels, -1).contiguous()
    if rate != sample_rate:
        track = torchaudio.functional.resample(track, rate, sample_rate)
    return track, rate


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.chunk_seconds <= 0 or not 0 <= args.overlap < 1 or args.batch < 1:
        print("error: need --chunk-seconds > 0, 0 <= --overlap < 1 and --batch >= 1", file=sys.stderr)
        return 2
    if not args.input.is_file():
        print(f"error: no such file: {args.input}", file=sys.stderr)
        return 2
    model, cfg = load_model(args.checkpoint, args.device)
    if not isinstance(cfg.model, TFSWAConfig):
        print(f"error: {args.checkpoint} holds a {cfg.model.name} model, not a separator", file=sys.stderr)
        return 2
    rate = cfg.model.sample_rate
    track, file_rate = read_track(args.input, rate, cfg.model.channels)
    start = time.perf_counter()
    stems = separate_track(model, track, chunk=round(args.chunk_seconds * rate), overlap=args.overlap,
                           batch_size=args.batch, device=args.device)
    elapsed = time.perf_counter() - start
    if file_rate != rate:
        import torchaudio.functional

        stems = torchaudio.functional.resample(stems, rate, file_rate)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, stem in zip(cfg.model.sources, stems):
        soundfile.write(str(args.out / f"{name}.wav"), stem.T.numpy(), file_rate, subtype="FLOAT")
    seconds = track.shape[-1] / rate
    print(f"separated {seconds:.1f} s in {elapsed:.1f} s into {', '.join(cfg.model.sources)} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
