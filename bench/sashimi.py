"""SaShiMi on CPU: training-step throughput and peak memory, kernel memory at L = 131072, generation speed.

    OMP_NUM_THREADS=2 python bench/sashimi.py            # everything (several minutes on 2 cores)
    python bench/sashimi.py --only train generate        # a subset

Each case runs in its own process, so its peak RSS (ru_maxrss) is its own. The reference figures in
the table come from the public state-spaces/s4 pure-PyTorch path measured on the same 2-core machine
(SC09 model with GLU, 4.76 M parameters, fp32, AdamW). Training and kernel processes set glibc's mmap threshold to
128 KiB (see ``_return_freed_memory``): without it, freed activation buffers stay in the heap and
RSS overstates the live memory by ~1.8 GB at the SC09 shape. Generation processes do not (every
state-sized temporary would become an mmap/munmap pair), and report the median of five runs.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REFERENCE = {  # public reference, same machine (issue 3)
    "train diag": "2 249 samples/s, 10.7 GB",
    "train dplr": "774 samples/s, 15.6 GB",
    "train long": "out of memory on 24 GB",
    "generate 16": "2 098 samples/s",
    "generate 16 compiled": "2 098 samples/s",
}


def _return_freed_memory() -> None:
    """mallopt(M_MMAP_THRESHOLD, 128 KiB): large buffers come from mmap and go back to the OS when freed."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)
    except OSError:
        pass


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB


def _batch(batch: int, length: int):
    import torch

    y = torch.randint(0, 256, (batch, length))
    return {"x": torch.cat([torch.full((batch, 1), 128), y[:, :-1]], dim=1), "y": y}


def case_train(mode: str, batch: int, length: int, steps: int, config: str) -> dict:
    import torch

    from dist_audio.config import load_config
    from dist_audio.models import build_model
    from dist_audio.objectives import build_objective

    init = "legs" if mode == "dplr" else "diag-lin"
    cfg = load_config(ROOT / "configs/sashimi" / config,
                      ["model.glu=true", f"model.s4.mode={mode}", f"model.s4.init={init}", f"model.s4.l_max={length}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    objective = build_objective(cfg.model, cfg.data)
    optimizer = torch.optim.AdamW(model.param_groups(0.0), lr=1e-3)
    data = _batch(batch, length)
    times = []
    for _ in range(steps + 1):  # the first step allocates gradients and optimizer state
        start = time.perf_counter()
        loss, _ = objective.loss(model, data)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        times.append(time.perf_counter() - start)
    step_s = min(times[1:])
    return {"samples_per_s": batch * length / step_s, "step_s": step_s, "peak_rss_gb": _peak_rss_gb(),
            "params": sum(p.numel() for p in model.parameters())}


def case_kernel(mode: str, length: int) -> dict:
    """One S4 layer's kernel (H = 64, N = 64) at ``length``: forward + backward, peak RSS."""

    from dist_audio.models.s4 import S4Layer, SSMOptions

    init = "legs" if mode == "dplr" else "diag-lin"
    layer = S4Layer(64, SSMOptions(mode=mode, init=init, d_state=64, l_max=length))
    base = _peak_rss_gb()
    start = time.perf_counter()
    layer.kernel(length).square().sum().backward()
    return {"seconds": time.perf_counter() - start, "peak_rss_gb": _peak_rss_gb(), "before_gb": base,
            "naive_tensor_gb": 64 * 32 * length * 8 / 2**30}


def case_generate(batch: int, steps: int, compiled: bool) -> dict:
    import torch

    from dist_audio.config import load_config
    from dist_audio.models import build_model
    from dist_audio.models.heads import make_head
    from dist_audio.objectives.autoregressive import generate

    torch.set_num_threads(1)  # one step's tensors are too small to parallelise; threads only contend
    cfg = load_config(ROOT / "configs/sashimi/sc09.yaml", ["model.glu=true"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    head = make_head(cfg.model.bits, cfg.model.head)
    start = time.perf_counter()
    state = model.default_state(batch, compiled=compiled)
    compile_s = time.perf_counter() - start
    generate(model, head, num=batch, steps=64, first_token=128, state=state)  # warm-up
    rates = []
    for _ in range(5):  # this VM's speed drifts by ±15 % from run to run: the median of five runs
        start = time.perf_counter()
        generate(model, head, num=batch, steps=steps, first_token=128, state=state)
        rates.append(batch * steps / (time.perf_counter() - start))
    rate = sorted(rates)[2]
    return {"samples_per_s": rate, "ms_per_step": batch / rate * 1e3, "compile_s": compile_s}


CASES = {
    "train": [("train diag", "case_train", {"mode": "diag", "batch": 4, "length": 16000, "steps": 1,
                                            "config": "sc09.yaml"})],
    "train-dplr": [("train dplr", "case_train", {"mode": "dplr", "batch": 4, "length": 16000, "steps": 1,
                                                 "config": "sc09.yaml"})],
    "long": [("train long", "case_train", {"mode": "diag", "batch": 1, "length": 131072, "steps": 1,
                                           "config": "youtubemix.yaml"})],
    "kernel": [("kernel diag", "case_kernel", {"mode": "diag", "length": 131072}),
               ("kernel dplr", "case_kernel", {"mode": "dplr", "length": 131072})],
    "generate": [(f"generate {b}{' compiled' if c else ''}", "case_generate",
                  {"batch": b, "steps": 1000 if b < 256 else 250, "compiled": c})
                 for c in (False, True) for b in (1, 16, 256)],
}


def _describe(name: str, r: dict) -> str:
    if name.startswith("train"):
        return f"{r['samples_per_s']:.0f} samples/s ({r['step_s']:.1f} s/step), peak RSS {r['peak_rss_gb']:.2f} GiB"
    if name.startswith("kernel"):
        return (f"fwd+bwd {r['seconds']:.2f} s, peak RSS {r['peak_rss_gb']:.2f} GiB (process before: "
                f"{r['before_gb']:.2f}; one H×N×L complex64 tensor would be {r['naive_tensor_gb']:.2f} GiB)")
    compiled = f", after compiling for {r['compile_s']:.0f} s" if r["compile_s"] > 1 else ""
    return f"{r['samples_per_s']:.0f} samples/s ({r['ms_per_step']:.2f} ms/step){compiled}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(CASES), default=list(CASES), help="sections to run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        fn, kwargs = json.loads(args.worker)
        if fn != "case_generate":  # memory figures only: it makes every large temporary an mmap/munmap pair
            _return_freed_memory()
        print(json.dumps(globals()[fn](**kwargs)))
        return 0
    print(f"threads={os.environ.get('OMP_NUM_THREADS', 'unset')} load={os.getloadavg()}")
    print("| case | dist_audio | reference |\n|---|---|---|")
    for section in args.only:
        for name, fn, kwargs in CASES[section]:
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps([fn, kwargs])],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                result = "failed: " + proc.stderr.strip().splitlines()[-1]
            else:
                result = _describe(name, json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"| {name} {kwargs} | {result} | {REFERENCE.get(name, '')} |", flush=True)
    print(f"load after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
