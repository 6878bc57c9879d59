"""Activation memory and step time of the TF-SWA U-Net at the original project's layout (seed-003).

    python bench/tfswa.py                                  # memory at 1, 2, 3, 6, 12 s; time at 1, 2, 3 s
    python bench/tfswa.py --time-lengths 1 3 6 12          # the full timing sweep (several minutes)

Layout: ``configs/tfswa/seed-003.yaml`` (widths 16-128, depths 1-1-3-1, 4 heads, TFSWA modules at every
level, n_fft 2048, hop 512), 44.1 kHz stereo, batch 1, fp32, no activation checkpointing.

- Memory: bytes of distinct storages autograd saves for backward during one forward (saved-tensor
  hooks), the quantity behind the original project's 5.3 GB at 1 s. Traced under ``FakeTensorMode``
  (shapes only, nothing allocated); ``--check-real`` repeats the 1 s trace on real tensors.
- Time: wall time of one forward + backward on real tensors after a warm-up, all cores.
- Explicit comparison at 6 s: the same layers with ``F.scaled_dot_product_attention`` replaced by an
  explicit softmax(QKᵀ/√d)V, traced the same way (the explicit FSA alone would need ~9 GB).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_audio.config import load_config
from dist_audio.models import build_model
from dist_audio.models.tfswa import TFSWAUNet

CONFIG = Path(__file__).resolve().parents[1] / "configs/tfswa/seed-003.yaml"
ORIGINAL = {1.0: (5.3e9, 17.5), 2.0: (11e9, 36.0)}  # the original model on this machine: bytes saved, s/step
GB = 1e9


def saved_bytes(forward) -> int:
    """Bytes of the distinct storages that autograd keeps for backward while ``forward()`` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


def explicit_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """softmax(QKᵀ/√d)V with the attention matrix materialised (what the original project did)."""
    scores = (q @ k.transpose(-2, -1)) * (scale or q.shape[-1] ** -0.5)
    return scores.softmax(dim=-1) @ v


@contextmanager
def attention_kind(kind: str):
    if kind == "explicit":
        with mock.patch("torch.nn.functional.scaled_dot_product_attention", explicit_attention):
            yield
    else:
        yield


def samples(seconds: float, rate: int) -> int:
    return round(seconds * rate)


def traceable_istft(self: TFSWAUNet, spec: torch.Tensor, length: int) -> torch.Tensor:
    """Stand-in for ``torch.istft`` under FakeTensorMode (whose window check reads data). Like the real
    one it is linear after the inverse FFT, so it saves nothing large for backward."""
    return torch.fft.irfft(spec, n=self.n_fft, dim=-2).sum(dim=(-2, -1))


def model_memory(cfg, seconds: float, kind: str = "sdpa") -> int:
    with FakeTensorMode(), attention_kind(kind), mock.patch.object(TFSWAUNet, "istft", traceable_istft):
        model = build_model(cfg)
        mix = torch.empty(1, cfg.channels, samples(seconds, cfg.sample_rate))
        return saved_bytes(lambda: model(mix))


def stage0_layer_memory(cfg, seconds: float, kind: str) -> dict[str, int]:
    """Saved bytes of each attention layer of the first level's TFSWA module, and of the whole module."""
    with FakeTensorMode(), attention_kind(kind):
        model = build_model(cfg)
        module = model.encoder[0].attention
        frames = -(-(samples(seconds, cfg.sample_rate) // cfg.hop + 1) // model.multiple) * model.multiple
        bins = -(-(cfg.n_fft // 2 + 1) // model.multiple) * model.multiple
        x = torch.empty(1, frames, bins, cfg.dims[0], requires_grad=True)
        names = ["TSA", "FSA", "window", "shifted window"]
        out = {name: saved_bytes(lambda layer=layer: layer(x)) for name, layer in zip(names, module.layers)}
        out["TFSWA module"] = saved_bytes(lambda: module(x.permute(0, 3, 1, 2)))
        return out


def step_seconds(model: TFSWAUNet, seconds: float, rate: int) -> tuple[float, float]:
    """Wall and CPU seconds (all threads) of one forward + backward; on a busy machine CPU time / threads
    estimates the wall time an idle one would take."""
    mix = torch.randn(1, model.channels, samples(seconds, rate))
    start, start_cpu = time.perf_counter(), time.process_time()
    model(mix).abs().mean().backward()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    model.zero_grad(set_to_none=True)
    return elapsed, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=float, nargs="+", default=[1, 2, 3, 6, 12], help="seconds, memory")
    parser.add_argument("--time-lengths", type=float, nargs="*", default=[1, 2, 3], help="seconds, timed")
    parser.add_argument("--compare-seconds", type=float, default=6.0, help="length of the explicit comparison")
    parser.add_argument("--check-real", action="store_true", help="also trace 1 s on real tensors")
    args = parser.parse_args(argv)
    cfg = load_config(CONFIG).model
    print(f"TF-SWA at seed-003; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()}\n")

    print("| segment | saved for backward | × 1 s | fwd + bwd wall | CPU time / threads | original (saved / time) |")
    print("|---|---|---|---|---|---|")
    memory = {s: model_memory(cfg, s) for s in args.lengths}
    timed = {}
    if args.time_lengths:
        model = build_model(cfg)
        step_seconds(model, 0.25, cfg.sample_rate)  # warm-up
        timed = {s: step_seconds(model, s, cfg.sample_rate) for s in args.time_lengths}
    base = memory.get(1.0) or next(iter(memory.values()))
    for s in sorted(set(memory) | set(timed)):
        mem = f"{memory[s] / GB:.3f} GB" if s in memory else "-"
        ratio = f"{memory[s] / base:.2f}" if s in memory else "-"
        step = f"{timed[s][0]:.1f} s | {timed[s][1] / torch.get_num_threads():.1f} s" if s in timed else "- | -"
        orig = ORIGINAL.get(s)
        orig_text = f"{orig[0] / GB:.1f} GB / {orig[1]:.1f} s" if orig else ("OOM on 24 GB" if s >= 3 else "-")
        print(f"| {s:g} s | {mem} | {ratio} | {step} | {orig_text} |")
    print(f"\nload average after timing: {os.getloadavg()}")

    if args.check_real:
        model = build_model(cfg)
        real = saved_bytes(lambda: model(torch.randn(1, cfg.channels, cfg.sample_rate)))
        print(f"\n1 s on real tensors: {real / GB:.3f} GB saved (fake trace: {memory.get(1.0, 0) / GB:.3f} GB)")

    s = args.compare_seconds
    ours, explicit = stage0_layer_memory(cfg, s, "sdpa"), stage0_layer_memory(cfg, s, "explicit")
    print(f"\n## First-level attention at {s:g} s: fused SDPA vs explicit QKᵀ-softmax\n")
    print("| layer | SDPA | explicit | explicit / SDPA |")
    print("|---|---|---|---|")
    for name in ours:
        ratio = explicit[name] / ours[name]
        print(f"| {name} | {ours[name] / GB:.3f} GB | {explicit[name] / GB:.3f} GB | {ratio:.1f}× |")
    whole = model_memory(cfg, s), model_memory(cfg, s, "explicit")
    print(f"| whole model | {whole[0] / GB:.3f} GB | {whole[1] / GB:.3f} GB | {whole[1] / whole[0]:.1f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
