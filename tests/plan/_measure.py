"""Run real training steps on CPU and measure their peak memory, to check the planner against.

``python tests/plan/_measure.py --cases CASES.json [--world 2] --out DIR``: for each case (config,
overrides, micro-batch, length, checkpointing, precision) two AdamW steps of the config's model, the
second measured once the optimizer states exist; in one process, or in ``--world 2`` gloo processes
with FSDP2 sharded by the trainer's own ``shard_with_fsdp2`` (fp32 units for the model's
``fp32_classes`` under bf16, every block, then the root, each with its ``MixedPrecisionPolicy``). Writes
``DIR/rank<r>.json``: per case ``tracker_peak`` (torch's MemTracker, FSDPMemTracker under FSDP2,
over the second step, real tensors) and ``rss_delta`` (peak RSS over both steps above the RSS before
the model was built; the peak is reset between cases through /proc/self/clear_refs). Before that
baseline each case runs one throwaway step at its shapes and dtypes, so memory a CPU library keeps once
per process and kernel (oneDNN's primitives for a new shape or for bf16) is in the baseline, not
counted as training memory. Run it with
``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors go back to the OS and RSS follows live memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import psutil
import torch
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dist_audio.config import load_config
from dist_audio.plan.planner import config_workload
from dist_audio.process_exit import exit_without_teardown
from dist_audio.train.parallelize import shard_with_fsdp2


def peak_rss() -> int:
    """Peak resident set size of this process since the last ``reset_peak_rss`` (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def build(workload, case: dict, world: int) -> torch.nn.Module:
    """The case's model with its checkpointing and, on two processes, FSDP2 as the trainer shards it."""
    model = workload.build_model()
    workload.apply_checkpointing(model, case["checkpointing"])
    precision = case.get("precision", "fp32")
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        shard_with_fsdp2(model, init_device_mesh("cpu", (world,)),
                         mixed_precision="bf16" if precision == "bf16" else "no")
    elif precision != "fp32":
        raise ValueError("one-process cases measure fp32 only")
    return model


def measure(case: dict, world: int) -> dict:
    """Two AdamW steps of one case; MemTracker peak of the second and the peak-RSS rise over both."""
    workload = config_workload(load_config(case["config"], case.get("set", [])))
    warmup = build(workload, case, world)
    workload.loss(warmup, workload.make_batch(case["batch"], case["length"])).backward()
    del warmup
    gc.collect()
    baseline = psutil.Process().memory_info().rss
    reset_peak_rss()
    torch.manual_seed(0)
    model = build(workload, case, world)
    optimizer = torch.optim.AdamW(workload.param_groups(model), lr=1e-4, foreach=False)
    batch = workload.make_batch(case["batch"], case["length"])

    def step() -> None:
        workload.loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    inputs = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    if world > 1:  # FSDP2's all-gather buffers live in storages that FSDPMemTracker knows how to follow
        tracker = FSDPMemTracker(model, optimizer)
        tracker.track_inputs(tuple(inputs))
    else:
        tracker = MemTracker()
        tracker.track_external(model, optimizer, *inputs)
    with tracker:
        step()
    peak = sum(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())
    return {"tracker_peak": peak, "rss_delta": peak_rss() - baseline}


def run_rank(rank: int, cases: list[dict], world: int, out: str) -> None:
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{out}/rendezvous",
                                             rank=rank, world_size=world)
    results = [measure(case, world) for case in cases]
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
    if world > 1:
        torch.distributed.destroy_process_group()
        exit_without_teardown(0)  # a gloo thread finishing a collective must not abort a finished rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", required=True, help="JSON file: list of {config, set, batch, length, checkpointing}")
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cases = json.loads(Path(args.cases).read_text())
    if args.world == 1:
        run_rank(0, cases, 1, args.out)
    else:
        torch.multiprocessing.spawn(run_rank, args=(cases, args.world, args.out), nprocs=args.world)


if __name__ == "__main__":
    main()
