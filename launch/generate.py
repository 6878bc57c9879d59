"""Generate audio with a trained SaShiMi in recurrent mode, one sample per step for a whole batch.

    python launch/generate.py --checkpoint runs/sashimi-sc09 --num 8 --seconds 4 --out samples/

``--checkpoint`` takes an export directory, a checkpoint directory or a run directory. Each WAV is
written at the model's ``sample_rate``; the log-likelihood of each sample's generated part under the
model (temperature 1, no nucleus cut) is printed, in nats and in bits per sample.

``--compile`` compiles each stage's step ahead of time first (about 15-50 s per stage with a C++
compiler): on CPU it then generates about 3x faster, so it pays off from a few seconds of audio on.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import soundfile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_audio.config import SashimiConfig
from dist_audio.data.quantize import dequantize, quantize, zero_level
from dist_audio.inference import load_model
from dist_audio.models.heads import make_head
from dist_audio.objectives.autoregressive import deinterleave, generate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="export, checkpoint or run directory")
    parser.add_argument("--num", type=int, default=8, help="samples generated together as one batch")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each sample after the prefix")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--prefix", type=Path, help="WAV whose audio every sample continues")
    parser.add_argument("--out", type=Path, required=True, help="directory for sample_XX.wav")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads; one step's tensors are too small to gain from more")
    parser.add_argument("--compile", action="store_true",
                        help="compile the recurrent step ahead of time (needs a C++ compiler; ~3x faster on CPU)")
    return parser.parse_args(argv)


def read_prefix(path: Path, sample_rate: int, channels: int) -> torch.Tensor:
    """Float [T·C] audio (interleaved when C = 2), resampled to ``sample_rate``."""
    import torchaudio.functional

    audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    wave = torch.from_numpy(audio.T.copy())  # [c, t]
    if rate != sample_rate:
        wave = torchaudio.functional.resample(wave, rate, sample_rate)
    wave = wave.mean(0, keepdim=True) if channels == 1 else wave.expand(2, -1) if wave.shape[0] == 1 else wave[:2]
    return wave.T.reshape(-1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.num < 1 or args.seconds <= 0:
        print("error: --num must be >= 1 and --seconds > 0", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    model, cfg = load_model(args.checkpoint, args.device)
    if not isinstance(cfg.model, SashimiConfig):
        print(f"error: {args.checkpoint} holds a {cfg.model.name} model, not sashimi", file=sys.stderr)
        return 2
    bits, kind = cfg.model.bits, cfg.data.quantization
    channels = 2 if cfg.data.interleave_stereo else 1
    rate = cfg.model.sample_rate
    prefix = None
    if args.prefix is not None:
        tokens = quantize(read_prefix(args.prefix, rate, channels), bits, kind)
        prefix = tokens.expand(args.num, -1)
    steps = int(args.seconds * rate) * channels
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    state = None
    if args.compile:
        start = time.perf_counter()
        state = model.default_state(args.num, compiled=True)
        print(f"compiled the recurrent step for batch {args.num} in {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    tokens, log_likelihood = generate(
        model, make_head(bits, cfg.model.head, cfg.model.n_mixtures), num=args.num, steps=steps,
        first_token=zero_level(bits, kind), temperature=args.temperature, top_p=args.top_p, prefix=prefix,
        generator=generator, state=state)
    elapsed = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    audio = dequantize(tokens.cpu(), bits, kind)
    for i, wave in enumerate(audio):
        path = args.out / f"sample_{i:02d}.wav"
        soundfile.write(str(path), deinterleave(wave, channels).T.numpy(), rate)
        nats = log_likelihood[i].item()
        print(f"{path}: log-likelihood {nats:.1f} nats ({-nats / steps / math.log(2):.3f} bits/sample)")
    total = tokens.numel()
    print(f"generated {args.num} x {tokens.shape[1]} samples in {elapsed:.1f} s "
          f"({total / elapsed:.0f} samples/s on {args.device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
