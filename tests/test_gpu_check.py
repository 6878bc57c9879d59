"""``bench/gpu_check.py --dry-run``: the GPU check runs end to end on the CPU, so it cannot rot.

Every check the GPU run reports is present, none fails; what has no CPU form is skipped with a
reason, and the launches, planner, training steps, sampler and auto_fit runs around them execute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from gpu_check import MEMORY_CONFIGS, STRATEGIES, Job, child_environment, make_mode, run_jobs  # noqa: E402


def test_jobs_that_hang_or_fail_are_reported_and_the_others_finish(tmp_path: Path):
    (tmp_path / "logs").mkdir()
    done: list[Job] = []
    late = Job("late", [sys.executable, "-c", "pass"], None, done.append)
    jobs = [Job("hangs", [sys.executable, "-c", "import time; time.sleep(60)"], None,
                lambda job: [done.append(job), late][1:]),  # its follow-up comes after the deadline
            Job("raises", [sys.executable, "-c", "raise ValueError('bad shape')"], None, done.append),
            Job("works", [sys.executable, "-c", "print('fine')"], None, done.append)]
    start = time.perf_counter()
    run_jobs(jobs, parallel=3, deadline=start + 3.0, env=child_environment(True), logs=tmp_path / "logs")
    results = {job.name: job for job in done}
    assert results["hangs"].timed_out and "time limit" in results["hangs"].failure()
    assert time.perf_counter() - start < 10
    assert results["late"].not_started and "not started" in results["late"].failure()
    assert results["raises"].rc == 1 and "ValueError: bad shape" in results["raises"].failure()
    assert results["works"].rc == 0 and results["works"].output.strip() == "fine"


def test_dry_run_reports_every_check(tmp_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert all(set(c) >= {"name", "status", "detail"} and c["detail"] for c in report["checks"])
    assert not [c for c in report["checks"] if c["status"] == "fail"], proc.stdout[-4000:]
    expected = [f"test_mode/{s}/{p}/{m}" for s in STRATEGIES for p in ("fp32", "bf16", "fp16")
                for m in ("sashimi", "tfswa")]
    expected += [f"memory/{c.split('/')[1]}/{s}/{ac}/{p}" for c in MEMORY_CONFIGS for s in STRATEGIES
                 for ac in ("none", "blocks") for p in ("fp32", "bf16")]
    expected += [f"throughput/{c}/{p}" for c in ("sc09", "seed-003") for p in ("fp32", "bf16")]
    expected += ["generate/seed-000/batch1", "generate/seed-000/batch2", "auto_fit", "setup/data",
                 "setup/deepspeed_cpu_adam"]
    assert sorted(expected) == sorted(checks)
    ran = [f"test_mode/{s}/{p}/{m}" for s, p, m in make_mode(True).test_mode]
    assert all(checks[name]["status"] == "pass" for name in ran)
    throughput = [f"throughput/{c}/{p}" for c in ("sc09", "seed-003") for p in ("fp32", "bf16")]
    assert all(checks[name]["status"] == "pass" for name in throughput)
    # the CPU-less parts are skipped with their reason, after running what surrounds them
    assert "no CPU form" in checks["auto_fit"]["detail"] and "losses max rel. diff" in checks["auto_fit"]["detail"]
    assert "CUDA graphs have no CPU form" in checks["generate/seed-000/batch2"]["detail"]
    assert "one step ran" in checks["memory/seed-003/single/blocks/bf16"]["detail"]
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} |" in markdown for name in checks)
