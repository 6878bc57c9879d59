"""SaShiMi: size, causality, recurrent == convolutional, parameter groups, and a CPU overfit."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from dist_audio.config import S4Config, SashimiConfig, load_config
from dist_audio.models import build_model
from dist_audio.models.sashimi import ResidualBlock, SaShiMi
from dist_audio.objectives import build_objective

KERNELS = [("diag", "diag-lin"), ("dplr", "legs")]


def _small(mode: str, init: str, *, unet: bool = False, l_max: int = 4096, **overrides) -> SaShiMi:
    cfg = SashimiConfig(d_model=8, n_layers=1, pool=[4, 4], expand=2, ff=2, unet=unet, glu=True,
                        s4=S4Config(mode=mode, init=init, d_state=16, l_max=l_max), **overrides)
    return build_model(cfg)


@pytest.mark.parametrize(("glu", "expected"), [(False, 4.1e6), (True, 4.8e6)])
def test_parameter_count_matches_the_paper(glu, expected):
    """The paper's SC09 SaShiMi (d_model 64, 8 layers, pool [4, 4], expand 2, ff 2): ~4.1 M, ~4.8 M with GLU."""
    model = build_model(SashimiConfig(glu=glu))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - expected) / expected < 0.02, count


@pytest.mark.parametrize(("mode", "init"), KERNELS)
@pytest.mark.parametrize("unet", [False, True])
def test_output_at_t_ignores_inputs_after_t(mode, init, unet):
    torch.manual_seed(0)
    model = _small(mode, init, unet=unet, l_max=256).double().eval()
    x = torch.randint(0, 256, (2, 256))
    base = model(x)
    for t in (0, 5, 63, 64, 130, 255):
        changed = x.clone()
        changed[:, t] = (changed[:, t] + 17) % 256
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-12)
        assert (out[:, t] - base[:, t]).abs().max() > 1e-6  # position t sees its own input token


def test_length_not_a_multiple_of_the_pooling_is_padded_causally():
    torch.manual_seed(0)
    model = _small("diag", "diag-lin").double().eval()
    x = torch.randint(0, 256, (1, 70))
    torch.testing.assert_close(model(x[:, :37]), model(x)[:, :37], rtol=0, atol=1e-12)


def _relative_step_error(model: SaShiMi, x: torch.Tensor) -> float:
    with torch.no_grad():
        conv = model(x)
        state = model.default_state(x.shape[0])
        steps = []
        for t in range(x.shape[1]):
            out, state = model.step(x[:, t], state)
            steps.append(out)
    return ((torch.stack(steps, 1) - conv).abs().max() / conv.abs().max()).item()


@pytest.mark.parametrize(("mode", "init"), KERNELS)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-4), (torch.float32, 1e-3)])
def test_recurrent_steps_equal_the_convolution(mode, init, dtype, tolerance):
    """4096 steps from random weights, with pooling [4, 4]: max |step − conv| / max |conv| below tolerance."""
    torch.manual_seed(0)
    model = _small(mode, init, l_max=4096).to(dtype).eval()
    x = torch.randint(0, 256, (2, 4096))
    assert _relative_step_error(model, x) < tolerance


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="ahead-of-time compilation needs a C++ compiler")
def test_compiled_steps_equal_eager_steps_and_reset_restarts_them():
    """Every stage compiled (S4 DPLR, the longer recurrence) over all pooling phases, then run again."""
    torch.manual_seed(0)
    model = _small("dplr", "legs", l_max=64).eval()
    x = torch.randint(0, 256, (3, 40))
    eager, compiled = model.default_state(3), model.default_state(3, compiled=True)
    first = []
    for t in range(x.shape[1]):
        expected, _ = model.step(x[:, t], eager)
        out, _ = model.step(x[:, t], compiled)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        first.append(out)
    compiled.reset()
    again = torch.stack([model.step(x[:, t], compiled)[0] for t in range(x.shape[1])])
    torch.testing.assert_close(again, torch.stack(first), rtol=0, atol=0)


def test_recurrent_steps_equal_the_convolution_with_unet_blocks():
    torch.manual_seed(0)
    model = _small("diag", "diag-inv", unet=True).double().eval()
    assert _relative_step_error(model, torch.randint(0, 256, (2, 512))) < 1e-8


def test_param_groups_cover_every_parameter_once_with_ssm_settings():
    model = _small("dplr", "legs")
    groups = model.param_groups(weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    ssm = [g for g in groups if "lr" in g]
    assert len(ssm) == 1 and ssm[0]["lr"] == 1e-3 and ssm[0]["weight_decay"] == 0.0
    names = {name.rsplit(".", 1)[-1] for name, p in model.named_parameters()
             if any(p is q for q in ssm[0]["params"])}
    assert names == {"log_dt", "lam_log_re", "lam_im", "P", "B"}
    decayed = next(g for g in groups if g["weight_decay"] == 0.1)["params"]
    assert all(p.ndim >= 2 for p in decayed)


def test_fused_feed_forward_matches_the_plain_one_and_finite_differences():
    from dist_audio.models.sashimi import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(4, 2, dropout=0.0).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(ff(x), ff.step(x, None))  # fused vs plain forward
    names = ["w1", "b1", "w2", "b2"]
    params = dict(ff.named_parameters())
    assert torch.autograd.gradcheck(
        lambda v, *ps: torch.func.functional_call(ff, dict(zip(names, ps)), (v,)),
        [x, *(params[n].detach().clone().requires_grad_(True) for n in names)])


def test_block_classes_name_the_residual_blocks():
    model = _small("diag", "diag-lin")
    assert model.block_classes == (ResidualBlock,)
    assert sum(isinstance(m, ResidualBlock) for m in model.modules()) == 3 * 2  # 3 stages × (S4 + FF)


def _periodic_batch(batch: int, length: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random crops of one second of a 200 Hz tone with two harmonics at 16 kHz, mu-law tokens."""
    from dist_audio.data.quantize import quantize, zero_level

    t = torch.arange(16000 + length) / 16000
    wave = 0.5 * torch.sin(2 * math.pi * 200 * t) + 0.2 * torch.sin(2 * math.pi * 600 * t + 1.0) \
        + 0.1 * torch.sin(2 * math.pi * 1000 * t + 2.0)
    tokens = quantize(wave, 8, "mu-law")
    starts = torch.randint(0, 16000, (batch,), generator=generator)
    y = torch.stack([tokens[s:s + length] for s in starts.tolist()])
    x = torch.cat([torch.full((batch, 1), zero_level(8, "mu-law")), y[:, :-1]], dim=1)
    return {"x": x, "y": y}


def test_debug_config_overfits_a_periodic_waveform():
    """The debug model learns a periodic 1 s waveform to < 1 bit per sample within a few hundred CPU steps."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    cfg = load_config("configs/sashimi/debug.yaml")
    model = build_model(cfg.model)
    objective = build_objective(cfg.model, cfg.data)
    optimizer = torch.optim.AdamW(model.param_groups(0.0), lr=1e-2)
    for _ in range(300):
        loss, metrics = objective.loss(model, _periodic_batch(4, 1024, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if metrics["bits_per_sample"] < 0.5:
            break
    held_out = objective.evaluate(model.eval(), _periodic_batch(4, 2048, generator))
    assert held_out["bits_per_sample"].mean() < 1.0


def test_generate_script_writes_wavs_from_an_export(tmp_path, capsys):
    """launch/generate.py end to end: export dir in, a prefix WAV continued, WAVs and log-likelihoods out."""
    import importlib.util

    import numpy as np
    import soundfile
    from safetensors.torch import save_file

    from dist_audio.config import save_config

    cfg = load_config("configs/sashimi/debug.yaml")
    export = tmp_path / "export"
    export.mkdir()
    save_file(build_model(cfg.model).state_dict(), str(export / "model.safetensors"))
    save_config(cfg, export / "config.yaml")
    soundfile.write(str(tmp_path / "prefix.wav"), 0.3 * np.sin(np.arange(800) / 10), 8000)  # resampled
    spec = importlib.util.spec_from_file_location("generate", "launch/generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    code = script.main(["--checkpoint", str(export), "--num", "3", "--seconds", "0.05", "--top-p", "0.9",
                        "--prefix", str(tmp_path / "prefix.wav"), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    for i in range(3):
        info = soundfile.info(str(tmp_path / "out" / f"sample_{i:02d}.wav"))
        assert info.samplerate == 16000 and info.frames == 1600 + 800  # resampled prefix + 0.05 s
        assert f"sample_{i:02d}.wav: log-likelihood" in printed
    if shutil.which("g++") or shutil.which("c++"):  # --compile: the same samples from compiled steps
        assert script.main(["--checkpoint", str(export), "--num", "3", "--seconds", "0.05", "--top-p", "0.9",
                            "--prefix", str(tmp_path / "prefix.wav"), "--out", str(tmp_path / "compiled"),
                            "--device", "cpu", "--compile"]) == 0
        assert "compiled the recurrent step for batch 3" in capsys.readouterr().out
        for i in range(3):
            eager, _ = soundfile.read(str(tmp_path / "out" / f"sample_{i:02d}.wav"))
            compiled, _ = soundfile.read(str(tmp_path / "compiled" / f"sample_{i:02d}.wav"))
            np.testing.assert_array_equal(compiled, eager)
