"""Whole-track separation (overlap-add) and the separate / evaluate command lines."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import pytest
import soundfile
import torch
from safetensors.torch import save_file
from torch import nn

from dist_audio.config import load_config, save_config
from dist_audio.models import build_model
from dist_audio.separate import chunk_starts, fade_window, separate_track

ROOT = Path(__file__).resolve().parents[1]


def launcher(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PointwiseSeparator(nn.Module):
    """Each source is a fixed mix of the channels at the same instant: chunking cannot change it."""

    def __init__(self):
        super().__init__()
        self.gains = nn.Parameter(torch.tensor([[[1.0, 0.5]], [[-0.3, 2.0]], [[0.1, 0.1]]]))  # [s, 1, c]
        self.calls: list[tuple[tuple[int, ...], str]] = []

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        self.calls.append((tuple(mix.shape), mix.device.type))
        return (self.gains.unsqueeze(0) @ mix.unsqueeze(1)).expand(-1, -1, mix.shape[1], -1)


def test_fades_are_complementary_so_overlapping_weights_sum_to_one():
    chunk, hop = 1000, 750
    window = fade_window(chunk, chunk - hop)
    total = torch.zeros(10 * chunk)
    for start in range(0, 9 * chunk, hop):
        total[start:start + chunk] += window
    assert torch.allclose(total[chunk:8 * chunk], torch.ones(7 * chunk), atol=1e-6)
    assert window.min() > 0 and window.max() == 1


def test_chunks_cover_the_track():
    assert chunk_starts(100, 100, 75) == [0]
    starts = chunk_starts(1000, 300, 225)
    assert starts[0] == 0 and starts[-1] == 700 and all(b - a <= 225 for a, b in itertools.pairwise(starts))


@pytest.mark.parametrize(("overlap", "batch"), [(0.25, 4), (0.5, 3), (0.0, 1)])
def test_overlap_add_equals_one_pass_for_a_pointwise_model(overlap, batch):
    torch.manual_seed(0)
    model = PointwiseSeparator()
    track = torch.randn(2, 10_007)
    with torch.no_grad():
        whole = model(track[None])[0]
    pieces = separate_track(model, track, chunk=1000, overlap=overlap, batch_size=batch)
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=1e-5)


def test_short_track_goes_through_the_real_model_in_one_pass():
    torch.manual_seed(0)
    model = build_model(load_config("configs/tfswa/debug.yaml").model).eval()
    track = torch.randn(2, 7000) * 0.1
    with torch.no_grad():
        whole = model(track[None])[0]
    torch.testing.assert_close(separate_track(model, track, chunk=8000), whole)


def test_device_memory_does_not_grow_with_track_length():
    """The model only ever sees at most ``batch`` chunks, however long the track: its peak is fixed."""
    sizes = {}
    for seconds in (5, 60):
        model = PointwiseSeparator()
        separate_track(model, torch.randn(2, 1000 * seconds), chunk=1000, overlap=0.25, batch_size=4)
        sizes[seconds] = max(torch.Size(shape).numel() for shape, _ in model.calls)
        assert all(shape[-1] == 1000 and shape[0] <= 4 for shape, _ in model.calls)
    assert sizes[5] == sizes[60] == 4 * 2 * 1000


@pytest.fixture
def debug_export(tmp_path: Path) -> Path:
    """An export directory (model.safetensors + config.yaml) of an untrained debug model."""
    cfg = load_config("configs/tfswa/debug.yaml")
    export = tmp_path / "export"
    export.mkdir()
    save_file(build_model(cfg.model).state_dict(), str(export / "model.safetensors"))
    save_config(cfg, export / "config.yaml")
    return export


def test_separate_cli_writes_one_wav_per_stem(debug_export, tmp_path):
    song = tmp_path / "song.wav"
    soundfile.write(str(song), (torch.randn(22050 * 3, 2) * 0.1).numpy(), 22050)  # resampled to 16 kHz and back
    out = tmp_path / "stems"
    argv = ["--checkpoint", str(debug_export), "--input", str(song), "--out", str(out), "--chunk-seconds", "1",
            "--batch", "2", "--device", "cpu"]
    assert launcher("separate").main(argv) == 0
    for stem in ("drums", "bass", "other", "vocals"):
        audio, rate = soundfile.read(str(out / f"{stem}.wav"))
        assert rate == 22050 and audio.shape == (22050 * 3, 2)


def test_separate_cli_rejects_bad_arguments(debug_export, tmp_path):
    argv = ["--checkpoint", str(debug_export), "--input", str(tmp_path / "missing.wav"), "--out", str(tmp_path)]
    assert launcher("separate").main(argv) == 2
    assert launcher("separate").main([*argv, "--overlap", "1.5"]) == 2


def test_evaluate_cli_reports_sdr_per_stem(debug_export, musdb_shards, capsys):
    argv = ["--checkpoint", str(debug_export), "--data", str(musdb_shards), "--split", "valid", "--json",
            "--max-batches", "2", "--device", "cpu"]
    assert launcher("evaluate").main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    assert {"loss", "sdr/drums", "sdr/bass", "sdr/other", "sdr/vocals", "sdr/avg"} <= set(results)
    assert results["samples"] > 0
