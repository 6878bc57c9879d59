"""A small synthetic corpus for the demo and the tests, generated with numpy (no downloads).

``root/speech/``: 16 kHz mono clips of voiced, speech-like sound (a glottal pulse train with a gliding
pitch, shaped by formant resonances and syllable envelopes). ``root/musdb/{train,test}/<track>/``:
16 kHz stereo MUSDB18-HQ-style tracks whose four stems each have their own character (drums: noise
bursts on a beat, bass: low sine notes, other: chords, vocals: a vibrato tone), with
``mixture.wav`` = the sum of the stems. Everything is deterministic in ``seed``.

    python -m data_prep.demo ROOT [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import lfilter

__all__ = ["MUSDB_STEMS", "make_demo_corpus"]

SAMPLE_RATE = 16_000
MUSDB_STEMS = ("drums", "bass", "other", "vocals")
_SPEECH_CLIPS = 12
_MUSDB_TRACKS = {"train": 4, "test": 2}


def make_demo_corpus(root: str | Path, *, seed: int = 0) -> Path:
    """Write the demo corpus under ``root`` and return ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    speech_dir = root / "speech"
    for i in range(_SPEECH_CLIPS):
        speaker = speech_dir / f"speaker{i % 3}"
        speaker.mkdir(parents=True, exist_ok=True)
        seconds = rng.uniform(3.0, 8.0)
        sf.write(speaker / f"clip{i:02d}.wav", _speech_clip(rng, seconds), SAMPLE_RATE, subtype="PCM_16")
    for split, count in _MUSDB_TRACKS.items():
        for i in range(count):
            track = root / "musdb" / split / f"{split} song {i:02d}"
            track.mkdir(parents=True, exist_ok=True)
            stems = _music_stems(rng, rng.uniform(10.0, 20.0))
            mixture = sum(stems.values())
            for name, audio in {"mixture": mixture, **stems}.items():
                sf.write(track / f"{name}.wav", audio, SAMPLE_RATE, subtype="PCM_16")
    return root


def _speech_clip(rng: np.random.Generator, seconds: float) -> np.ndarray:
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    base = rng.uniform(90, 220)
    f0 = base * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.3, 1.2) * t + rng.uniform(0, 2 * np.pi)))
    phase = np.cumsum(f0) / SAMPLE_RATE
    pulses = np.diff(np.floor(phase), prepend=0.0)  # one impulse per pitch period
    source = lfilter([1.0], [1.0, -0.97], pulses) + 0.02 * rng.standard_normal(n)
    voice = np.zeros(n)
    for formant, bandwidth in zip(rng.uniform([500, 1200, 2400], [900, 2000, 3200]), (80, 120, 200)):
        voice += _resonance(source, formant, bandwidth)
    syllable_rate = rng.uniform(3, 5)
    envelope = np.clip(np.sin(np.pi * syllable_rate * t + rng.uniform(0, np.pi)), 0, None) ** 0.7
    audio = voice * envelope
    return (0.5 * audio / (np.abs(audio).max() + 1e-9)).astype(np.float32)


def _resonance(x: np.ndarray, freq: float, bandwidth: float) -> np.ndarray:
    """Two-pole resonator: a formant of the vocal tract."""
    r = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
    theta = 2 * np.pi * freq / SAMPLE_RATE
    return lfilter([1 - r], [1.0, -2 * r * np.cos(theta), r * r], x)


def _music_stems(rng: np.random.Generator, seconds: float) -> dict[str, np.ndarray]:
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    beat = rng.uniform(0.35, 0.6)  # seconds per beat
    root_hz = rng.uniform(55, 98)

    drums = np.zeros(n)
    for start in np.arange(0, seconds, beat / 2):
        i = int(start * SAMPLE_RATE)
        length = min(int(0.12 * SAMPLE_RATE), n - i)
        decay = np.exp(-np.arange(length) / (0.02 * SAMPLE_RATE))
        drums[i : i + length] += rng.standard_normal(length) * decay * rng.uniform(0.5, 1.0)

    note = np.floor(t / (2 * beat)).astype(int)
    bass_hz = root_hz * np.array([1.0, 4 / 3, 3 / 2, 1.0])[note % 4]
    bass = np.sin(2 * np.pi * np.cumsum(bass_hz) / SAMPLE_RATE)

    chord_root = 2 * root_hz * np.array([1.0, 1.5, 4 / 3, 1.2])[np.floor(t / (4 * beat)).astype(int) % 4]
    other = sum(np.sin(2 * np.pi * np.cumsum(chord_root * ratio) / SAMPLE_RATE) for ratio in (1.0, 1.25, 1.5))
    other = other / 3

    vocal_hz = 4 * root_hz * (1 + 0.01 * np.sin(2 * np.pi * 5.5 * t))
    vocals = np.sin(2 * np.pi * np.cumsum(vocal_hz) / SAMPLE_RATE) * (0.5 + 0.5 * np.sin(np.pi * t / beat) ** 2)

    stems = {}
    for name, mono, rms in zip(MUSDB_STEMS, (drums, bass, other, vocals), (0.06, 0.07, 0.05, 0.06)):
        pan = rng.uniform(0.3, 0.7)
        stereo = np.stack([mono * (1 - pan), mono * pan], axis=1)
        stems[name] = rms * stereo / (np.sqrt(np.mean(stereo**2)) + 1e-9)
    peak = np.abs(sum(stems.values())).max()
    scale = min(1.0, 0.9 / peak)  # one gain for all stems: the mixture stays their sum and never clips
    return {name: (scale * stereo).astype(np.float32) for name, stereo in stems.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="directory to write speech/ and musdb/ into")
    parser.add_argument("--seed", type=int, default=0, help="random seed (the corpus is deterministic in it)")
    args = parser.parse_args(argv)
    root = make_demo_corpus(args.root, seed=args.seed)
    print(f"demo corpus written to {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
