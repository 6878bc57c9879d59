"""The planner's parts: model-state layouts, the fake-tensor trace, the plan, the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _toy import Toy, toy_workload
from torch.distributed._tools.mem_tracker import MemTracker

from dist_audio.config import config_from_dict
from dist_audio.plan import (
    STRATEGIES,
    ParamLayout,
    Tracer,
    format_text,
    make_plan,
    model_states,
    param_layout,
    parse_memory,
    plot,
    predict,
)
from dist_audio.plan.planner import GIB

REPO = Path(__file__).parents[2]
LAYOUT = ParamLayout(total=1_000_000, largest_unit=100_000, root=50_000, persistent=20_000, units=9)


def test_model_states_follow_each_engines_layout():
    P, U, R, S = 1_000_000, 100_000, 50_000, 20_000
    ddp = model_states("ddp", "fp32", LAYOUT, 4)
    assert (ddp.params, ddp.grads, ddp.grad_buffers, ddp.optimizer) == (4 * P, 4 * P, 4 * P, 8 * P)
    assert model_states("ddp", "fp32", LAYOUT, 1).grad_buffers == 0  # one process: no DDP wrapper
    zero2 = model_states("zero2", "bf16", LAYOUT, 4)
    assert zero2.params == 2 * P and zero2.optimizer == 12 * P / 4 and zero2.grads == 2 * P / 4 + 4 * P / 4
    zero3 = model_states("zero3", "fp32", LAYOUT, 4)
    assert zero3.params == 4 * (S + (P - S) / 4) + 2 * 4 * U
    fsdp = model_states("fsdp", "bf16", LAYOUT, 4)
    assert fsdp.params == 4 * P / 4 + 2 * (R + 2 * U) and fsdp.optimizer == 8 * P / 4
    for offload in ("zero3_offload", "fsdp_offload"):
        states = model_states(offload, "fp32", LAYOUT, 4)
        assert states.optimizer == 0 and states.host >= 16 * P / 4
    for sharded in ("zero3", "fsdp"):  # more ranks, less per GPU
        per_gpu = [model_states(sharded, "fp32", LAYOUT, n) for n in (1, 2, 8)]
        totals = [s.params + s.grads + s.optimizer for s in per_gpu]
        assert totals[0] > totals[1] > totals[2]
    with pytest.raises(ValueError, match="unknown strategy"):
        model_states("zero4", "fp32", LAYOUT, 1)


def test_param_layout_counts_blocks_root_and_small_tensors():
    with torch.device("meta"):
        model = Toy(width=64, depth=4)
    layout = param_layout(model, persistence_threshold=10_000)
    block = sum(p.numel() for p in model.blocks[0].parameters())
    assert layout.total == sum(p.numel() for p in model.parameters())
    assert layout.units == 4 and layout.largest_unit == block
    assert layout.root == layout.total - 4 * block
    assert layout.persistent == sum(p.numel() for p in model.parameters() if p.numel() < 10_000)


def test_fake_trace_matches_real_tensors():
    """The fake-tensor trace sees the same bytes as MemTracker over the same step on real tensors."""
    workload = toy_workload()
    trace = Tracer(workload, cuda=False).step(2, 512)
    torch.manual_seed(0)
    model = workload.build_model()
    batch = workload.make_batch(2, 512)
    tracker = MemTracker()
    tracker.track_external(model, *batch.values())
    with tracker:
        workload.loss(model, batch).backward()
    real_peak = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
    activations, temporary, grads = trace.dynamic_peak(trace.grads, 0.0)
    assert trace.params == 4 * sum(p.numel() for p in model.parameters())
    assert trace.params + activations + temporary + grads == pytest.approx(real_peak, rel=1e-6)


def test_checkpointing_and_bf16_shrink_traced_activations():
    tracer = Tracer(toy_workload(), cuda=False)
    full = tracer.step(2, 2048).activations.max()
    assert tracer.step(2, 2048, checkpointing="blocks").activations.max() < full / 2
    assert tracer.step(2, 2048, precision="bf16").activations.max() < full


def test_cuda_accounting_adds_allocator_rounding_and_runtime():
    workload = toy_workload()
    on_cpu, on_cuda = Tracer(workload, cuda=False), Tracer(workload, cuda=True)
    cpu, cuda = on_cpu.step(1, 100), on_cuda.step(1, 100)
    assert cuda.activations.max() > cpu.activations.max()  # 512-byte blocks
    row_cpu = predict(cpu, on_cpu.optimizer(), "ddp", LAYOUT, 1, 1, cuda=False)
    row_cuda = predict(cuda, on_cuda.optimizer(), "ddp", LAYOUT, 1, 1, cuda=True)
    assert row_cuda.temporary - row_cpu.temporary >= 0.5 * GIB


def toy_config(batch_size: int = 4):
    return config_from_dict({"model": {"name": "sashimi"},
                             "data": {"shards": "nowhere", "batch_size": batch_size, "segment_seconds": 0.125}})


@pytest.fixture(scope="module")
def toy_plan():
    return make_plan(toy_config(), gpus=2, gpu_memory=parse_memory("0.8GiB"), workload=toy_workload(),
                     sample_rate=16000, config_path="toy.yaml")


def test_plan_json_has_the_documented_keys(toy_plan):
    data = json.loads(json.dumps(toy_plan.as_dict()))
    assert {"rows", "recommended", "max_micro_batch", "max_segment_seconds", "accelerate_config"} <= set(data)
    assert len(data["rows"]) == 6 * 2 * 2
    assert {r["strategy"] for r in data["rows"]} == set(STRATEGIES)
    assert {r["activation_checkpointing"] for r in data["rows"]} == {"none", "blocks"}
    assert {r["precision"] for r in data["rows"]} == {"fp32", "bf16"}
    for row in data["rows"]:
        assert set(row) == {"strategy", "activation_checkpointing", "precision", "per_gpu_gib", "host_gib", "fits"}
        parts = row["per_gpu_gib"]
        assert set(parts) == {"params", "grads", "optimizer", "activations", "temporary", "total"}
        assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"), abs=0.01)
        assert row["fits"] == (parts["total"] <= data["inputs"]["budget_gib"] + 1e-3)
    assert (REPO / data["accelerate_config"]).is_file()


def test_recommended_is_the_fastest_row_that_fits(toy_plan):
    order = ["ddp", "zero2", "zero3", "fsdp", "zero3_offload", "fsdp_offload"]
    fitting = [r for r in toy_plan.rows if r.fits]
    best = toy_plan.recommended
    assert best is not None and best.fits
    for row in fitting:
        assert order.index(row.strategy) >= order.index(best.strategy)
        if row.strategy == best.strategy and best.activation_checkpointing == "blocks":
            assert row.activation_checkpointing == "blocks"  # no fitting row without recomputation


def test_max_micro_batch_and_segment_fit_and_one_more_does_not(toy_plan):
    from dist_audio.plan import Planner

    best = toy_plan.recommended
    planner = Planner(toy_workload(), param_layout_for_toy(), gpus=2, gpu_memory=parse_memory("0.8GiB"))
    length = toy_plan.inputs["length"]
    batch = toy_plan.max_micro_batch.value
    assert toy_plan.max_micro_batch.fit_error < 0.05
    assert planner.row(best.strategy, batch, length, best.precision, best.activation_checkpointing).fits
    assert not planner.row(best.strategy, batch + 2, length, best.precision, best.activation_checkpointing).fits
    longest = int(toy_plan.max_segment.value * 16000)
    assert planner.row(best.strategy, 4, longest, best.precision, best.activation_checkpointing).fits


def param_layout_for_toy() -> ParamLayout:
    with torch.device("meta"):
        return param_layout(Toy())


def test_text_and_plot(toy_plan, tmp_path):
    text = format_text(toy_plan)
    assert "recommended:" in text and toy_plan.accelerate_config in text and "512 B" in text
    plot(toy_plan, tmp_path / "plan.png")
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("text, expected", [("24GiB", 24 * GIB), ("80GB", 80 * 10**9), ("512MiB", 512 * 2**20),
                                            ("24", 24 * GIB)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import plan as plan_cli
    finally:
        sys.path.pop(0)
    code = plan_cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args, key", [
    (["--gpu-memory", "lots"], "--gpu-memory"),
    (["--gpu-memory", "24GiB", "--set", "data.batch_size=0"], "data.batch_size"),
    (["--gpu-memory", "24GiB", "--set", "model.no_such_key=1"], "model.no_such_key"),
    (["--gpu-memory", "24GiB", "--margin", "1.5"], "--margin"),
])
def test_cli_user_errors_are_one_line_naming_the_key(args, key, capsys):
    code, out, err = run_cli(["--config", str(REPO / "configs/sashimi/debug.yaml"), "--gpus", "1", *args], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and key in err


def test_cli_plans_the_debug_config_as_json(capsys, tmp_path):
    code, out, _ = run_cli(["--config", str(REPO / "configs/sashimi/debug.yaml"), "--gpus", "1",
                            "--gpu-memory", "2GiB", "--json", "--plot", str(tmp_path / "p.png")], capsys)
    data = json.loads(out)
    assert code == 0 and data["recommended"]["fits"] and data["max_micro_batch"] >= 4
    assert data["accelerate_config"] == "configs/accelerate/single.yaml"
    assert (tmp_path / "p.png").is_file()


def test_nothing_fits_says_so_and_searches_the_smallest_row():
    plan = make_plan(toy_config(), gpus=1, gpu_memory=parse_memory("0.4GiB"), workload=toy_workload(),
                     sample_rate=16000)
    data = plan.as_dict()
    assert data["recommended"] is None and not any(r["fits"] for r in data["rows"])
    assert data["max_micro_batch"] == 0  # the CUDA runtime reserve alone exceeds 0.36 GiB
    assert plan.searched_row.total == min(r.total for r in plan.rows if r.precision == "fp32")  # the run's own
    assert "nothing fits" in format_text(plan)


def test_bf16_is_traced_as_each_engine_stores_parameters():
    """DeepSpeed casts every parameter; FSDP2 keeps the model's fp32_classes in fp32 (their own units)."""
    from dist_audio.config import load_config
    from dist_audio.plan import config_workload
    from dist_audio.train.parallelize import fp32_modules

    cfg = load_config(REPO / "configs/sashimi/debug.yaml", ["model.d_model=32", "model.n_layers=2"])
    tracer = Tracer(config_workload(cfg), cuda=False)
    kept = {id(p) for m in fp32_modules(tracer.model("none", "fsdp2")) for p in m.parameters()}
    assert kept, "SaShiMi names its SSM kernels in fp32_classes"
    for param in tracer.model("none", "fsdp2").parameters():
        assert param.dtype == (torch.float32 if id(param) in kept else torch.bfloat16)
    assert {p.dtype for p in tracer.model("none", "parameters").parameters()} == {torch.bfloat16}
    assert {p.dtype for p in tracer.model("none").parameters()} == {torch.float32}  # fp32 and autocast
    traces = {how: tracer.step(1, 2048, precision="bf16", bf16_as=how) for how in ("autocast", "parameters", "fsdp2")}
    fp32 = tracer.step(1, 2048)
    for trace in traces.values():
        assert trace.grads < fp32.grads or trace.bf16_as == "autocast"  # bf16 gradients under the engines
        assert np.isfinite(trace.activations).all() and trace.activations.max() > 0
    assert traces["parameters"].grads == fp32.grads // 2  # every gradient bf16


def test_plan_keeps_the_runs_precision():
    """The recommendation and the launch line keep train.mixed_precision; the line is a valid config."""
    from dist_audio.config import load_config

    for precision in ("no", "bf16"):
        cfg = config_from_dict({"model": {"name": "sashimi"}, "train": {"mixed_precision": precision},
                                "data": {"shards": "nowhere", "batch_size": 4, "segment_seconds": 0.125}})
        plan = make_plan(cfg, gpus=1, gpu_memory=parse_memory("0.8GiB"), workload=toy_workload(), sample_rate=16000,
                         workers=1)
        assert plan.recommended is not None
        assert plan.recommended.precision == ("fp32" if precision == "no" else "bf16")
        assert plan.searched_row.precision == plan.recommended.precision
        overrides = plan.launch.split("--set ")[1:]
        assert f"train.mixed_precision={precision}" in [o.strip() for o in overrides]
        load_config(REPO / "configs/sashimi/debug.yaml", [o.strip() for o in overrides])  # accepted as printed


def test_parallel_traces_equal_in_process_traces(tmp_path):
    """Forked tracing workers give the very numbers one process gives (fresh process: fork needs autograd
    untouched in the parent)."""
    script = f"""
import json, sys
sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests' / 'plan')!r}]
from _toy import toy_workload
from dist_audio.config import config_from_dict
from dist_audio.plan import make_plan, parse_memory
cfg = config_from_dict({{"model": {{"name": "sashimi"}}, "data": {{"shards": "x", "batch_size": 4,
                        "segment_seconds": 0.125}}}})
plans = [make_plan(cfg, gpus=2, gpu_memory=parse_memory("0.8GiB"), workload=toy_workload(), sample_rate=16000,
                   workers=w).as_dict() for w in (2, 1)]
for p in plans:
    p.pop("planner_seconds"); p.pop("table_seconds")
print(json.dumps(plans))
"""
    import subprocess

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    parallel, serial = json.loads(out.stdout.strip().splitlines()[-1])
    assert parallel == serial


def test_trace_cache_returns_the_traced_step(tmp_path):
    from dist_audio.plan.trace import TraceCache

    cache = TraceCache(tmp_path)
    trace = Tracer(toy_workload(), cuda=False).step(1, 64)
    key = (1, 64, "fp32", "none", None)
    assert cache.load("toy", key, False) is None
    cache.save("toy", key, False, trace)
    loaded = cache.load("toy", key, False)
    assert loaded is not None and np.array_equal(loaded.activations, trace.activations)
    assert loaded.grads == trace.grads
    assert cache.load("toy", key, True) is None and cache.load("other", key, False) is None


@pytest.mark.parametrize("config", ["configs/sashimi/debug.yaml", "configs/tfswa/debug.yaml"])
def test_views_by_meta_kernel_trace_what_fake_tensors_trace(config, monkeypatch):
    """The tracer answers view operators with ATen's meta kernel instead of FakeTensorMode's Python path
    (``trace._run_operator``); the traced step must be the same to the byte, in every precision."""
    from dist_audio.config import load_config
    from dist_audio.plan import config_workload
    from dist_audio.plan import trace as trace_module

    workload = config_workload(load_config(REPO / config, []))
    keys = [("fp32", "none", "autocast"), ("fp32", "blocks", "autocast"), ("bf16", "none", "autocast"),
            ("bf16", "blocks", "parameters"), ("bf16", "none", "fsdp2")]

    def traces() -> list:
        tracer = Tracer(workload, cuda=True)
        return [tracer.step(2, 4096, precision=p, checkpointing=c, bf16_as=h) for p, c, h in keys]

    # A process's first fake hann_window keeps a storage 4 bytes longer than later (cached) ones: build
    # once first, so that both sides below see the same buffers.
    Tracer(workload).model("none")
    fast = traces()
    monkeypatch.setattr(trace_module, "_run_operator", lambda func, args, kwargs: func(*args, **(kwargs or {})))
    reference = traces()
    for a, b in zip(fast, reference):
        for name in ("activations", "temporary", "grad_fraction"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert (a.params, a.buffers, a.grads, a.largest_alloc, a.sdpa_workspace) == \
            (b.params, b.buffers, b.grads, b.largest_alloc, b.sdpa_workspace)
