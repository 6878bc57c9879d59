"""TF-SWA U-Net: shapes, exact STFT round trip, parameter groups, linear activation memory, overfitting."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from dist_audio.config import TFSWAConfig, load_config
from dist_audio.models import build_model
from dist_audio.models.tfswa import AttentionLayer, ResidualBlock, TFSWAUNet
from dist_audio.objectives import build_objective

DEBUG = "configs/tfswa/debug.yaml"


def tiny(**overrides) -> TFSWAUNet:
    settings = dict(sources=3, channels=2, n_fft=128, hop=32, dims=(8, 16), depths=(1, 1), heads=2, window=(4, 4))
    return TFSWAUNet(**{**settings, **overrides})


@pytest.mark.parametrize("placement", ["bottleneck", "every_stage"])
@pytest.mark.parametrize("output", ["mask", "magnitude"])
def test_output_shape_and_gradients(placement, output):
    torch.manual_seed(0)
    model = tiny(placement=placement, output=output, subbands=2)
    mix = torch.randn(2, 2, 3001)  # not a multiple of the hop
    out = model(mix)
    assert out.shape == (2, 3, 2, 3001)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_built_from_config_names_its_blocks():
    cfg = load_config(DEBUG)
    model = build_model(cfg.model)
    assert isinstance(model, TFSWAUNet)
    kinds = {type(m) for m in model.modules() if isinstance(m, model.block_classes)}
    assert kinds == {ResidualBlock, AttentionLayer}
    assert model(torch.zeros(1, 2, 1600)).shape == (1, 4, 2, 1600)


def test_param_groups_cover_every_parameter_once_and_spare_norms_and_biases():
    model = tiny(placement="every_stage")
    decay, no_decay = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    spared = {id(p) for name, p in model.named_parameters() if name.endswith("bias") or ".norm" in name
              or isinstance(model.get_submodule(name.rsplit(".", 1)[0]), torch.nn.LayerNorm)}
    assert spared == {id(p) for p in no_decay["params"]}


def test_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="expected mixture"):
        tiny()(torch.zeros(1, 1, 1000))


@pytest.mark.parametrize("length", [44100, 44100 + 123])
def test_identity_masks_return_the_mixture(length, monkeypatch):
    torch.manual_seed(0)
    model = TFSWAUNet(sources=2, channels=2, n_fft=2048, hop=441, dims=(8,), depths=(0,), heads=2)
    mix = torch.randn(1, 2, length) * 0.5
    monkeypatch.setattr(model, "estimate", lambda mag: torch.ones(mag.shape[0], 2, *mag.shape[1:]))
    out = model(mix)
    assert (out - mix.unsqueeze(1)).abs().max() < 1e-5


@pytest.mark.parametrize("precision", ["bf16 parameters", "bf16 autocast"])
def test_identity_masks_return_the_mixture_with_bf16_compute(precision):
    """The network runs in bf16 and outputs masks of exactly one; the STFT, masking and iSTFT stay fp32."""
    torch.manual_seed(0)
    model = TFSWAUNet(sources=2, channels=2, n_fft=512, hop=128, dims=(8, 16), depths=(1, 1), heads=2)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(30.0)  # sigmoid(30) == 1 in fp32
    mix = torch.randn(1, 2, 16000) * 0.5
    if precision == "bf16 parameters":  # as DeepSpeed casts them: parameters only, buffers stay fp32
        for param in model.parameters():
            param.data = param.data.bfloat16()
        context = contextlib.nullcontext()
    else:
        context = torch.autocast("cpu", dtype=torch.bfloat16)
    with context:
        out = model(mix)
    assert model.stem.weight.dtype == (torch.bfloat16 if precision == "bf16 parameters" else torch.float32)
    assert out.dtype == torch.float32
    assert (out - mix.unsqueeze(1)).abs().max() < 1e-5


def saved_bytes(model: torch.nn.Module, mix: torch.Tensor) -> int:
    """Bytes of distinct storages autograd keeps for backward during one forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(mix)
    return sum(storages.values())


def test_activation_memory_grows_linearly_with_segment_length():
    """The original project's layout (attention after every stage); 8 kHz and n_fft 128 keep it quick."""
    torch.manual_seed(0)
    cfg = TFSWAConfig(sample_rate=8000, n_fft=128, hop=64, dims=[16, 32, 64, 128], depths=[1, 1, 3, 1],
                      heads=4, window=[8, 8], attention="every_stage")
    model = build_model(cfg)
    short, long = (saved_bytes(model, torch.randn(1, 2, 8000 * s)) for s in (3, 12))
    assert long / short <= 4.5, f"3 s → 12 s grew activation memory {long / short:.2f}×"


def test_debug_config_overfits_tone_and_noise_bursts():
    """Two stems (a steady tone, bursts of noise): > 10 dB uSDR on unseen mixtures after a short run."""
    torch.manual_seed(0)
    cfg = load_config(DEBUG, ["model.sources=[tone,noise]", "data.sources=[tone,noise]"])
    sr, n = cfg.model.sample_rate, cfg.model.sample_rate // 4
    time = torch.arange(n) / sr
    gen = torch.Generator().manual_seed(0)

    def batch(size: int) -> dict:
        pitch = 200 + 600 * torch.rand(size, 1, 1, generator=gen)
        tone = (0.3 * torch.sin(2 * math.pi * pitch * time)).expand(size, 2, n)
        gate = ((time * 8 + torch.rand(size, 1, 1, generator=gen)) % 1 < 0.3).float()
        noise = 0.3 * torch.randn(size, 2, n, generator=gen) * gate
        stems = torch.stack([tone, noise], dim=1)
        return {"mixture": stems.sum(1), "stems": stems}

    model, objective = build_model(cfg.model), build_objective(cfg.model, cfg.data)
    optimizer = torch.optim.AdamW(model.param_groups(0.0), lr=3e-3)
    held_out = batch(4)
    for _ in range(50):
        loss, _ = objective.loss(model, batch(4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    metrics = objective.evaluate(model.eval(), held_out)
    assert set(metrics) >= {"loss", "sdr/tone", "sdr/noise", "sdr/avg"}
    assert metrics["sdr/avg"].shape == (4,)
    assert metrics["sdr/avg"].mean() > 10, {k: v.mean().item() for k, v in metrics.items()}
    preview = objective.preview(model, held_out, seconds=0.1)
    assert preview["tone"].shape == (2, round(0.1 * sr)) and preview["noise"].abs().max() <= 1
