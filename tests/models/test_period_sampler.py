"""``PeriodSampler`` (the unit a CUDA graph captures for fast generation) draws what ``generate`` draws."""

from __future__ import annotations

import torch

from dist_audio.config import load_config
from dist_audio.models import build_model
from dist_audio.models.heads import make_head
from dist_audio.objectives.autoregressive import PeriodSampler, generate

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_period_sampler_matches_generate_and_restarts():
    cfg = load_config(ROOT / "configs" / "sashimi" / "debug.yaml", ["data.shards=unused", "model.n_layers=2"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    head = make_head(cfg.model.bits, cfg.model.head)
    periods, batch = 3, 3
    sampler = PeriodSampler(model, head, batch, first_token=128, generator=torch.Generator().manual_seed(5))
    assert sampler.period == 16
    tokens, log_likelihood = sampler.run(periods)
    expected, expected_ll = generate(model, head, num=batch, steps=periods * 16, first_token=128,
                                     generator=torch.Generator().manual_seed(5))
    assert torch.equal(tokens, expected)
    torch.testing.assert_close(log_likelihood, expected_ll)
    sampler.generator.manual_seed(5)  # a second run starts again from the zero state
    again, _ = sampler.run(periods)
    assert torch.equal(again, expected)
