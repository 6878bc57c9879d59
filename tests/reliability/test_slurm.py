"""``launch/slurm.sbatch`` under a stand-in Slurm: ``srun`` and ``scontrol`` scripts on ``PATH`` that run
the job step on this machine as a one-node allocation (``srun`` passes SIGTERM on to its task, as the
real one does). The script itself, ``accelerate launch`` and two DDP ranks run for real.

Slurm's ``--signal=B:TERM@<grace>`` signals the batch script; the test does the same, twice, and also
signals one rank directly (what ``scancel`` does to every process of a step). The script passes one
SIGTERM on, through srun, to the ranks only; every rank finishes its step, checkpoints and exits 0, and
so do the launcher and the script.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fault_runs import QUICK, REPO, SASHIMI_DEBUG, free_port, rank_pids

from dist_audio.train.checkpoint import complete_checkpoints

STAND_IN_SRUN = """#!/bin/bash
# stand-in for srun on a one-node allocation: logs its arguments, runs the task as node 0 and passes a
# SIGTERM on to it
echo "srun $*" >> "$SRUN_LOG"
while [[ $1 == --* ]]; do shift; done
export SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0
"$@" &
task=$!
trap 'echo "srun: SIGTERM passed to the task" >> "$SRUN_LOG"; kill -TERM $task' TERM
while :; do
    wait $task; status=$?
    if (( status > 128 )) && kill -0 $task 2>/dev/null; then continue; fi
    break
done
exit $status
"""
STAND_IN_SCONTROL = "#!/bin/bash\necho 127.0.0.1\n"


def test_sbatch_passes_the_early_signal_once_and_every_rank_checkpoints(tmp_path, speech_shards):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"srun": STAND_IN_SRUN, "scontrol": STAND_IN_SCONTROL}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "runs" / "slurm"
    overrides = [f"data.shards={speech_shards}", f"train.runs_dir={tmp_path / 'runs'}", "train.name=slurm",
                 *QUICK, "train.max_steps=1000", "train.checkpoint_every=1000", "train.sample_log=true"]
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    env = {**os.environ, "PATH": path, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "SRUN_LOG": str(tmp_path / "srun.log"), "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1",
           "SLURM_GPUS_ON_NODE": "2",
           "ACCELERATE_CONFIG": "configs/accelerate/ddp.yaml", "MAIN_PROCESS_PORT": str(free_port()), "GRACE_S": "60"}
    log = tmp_path / "slurm.out"
    with open(log, "w") as out:
        job = subprocess.Popen(["bash", "launch/slurm.sbatch", str(SASHIMI_DEBUG),
                                *[a for item in overrides for a in ("--set", item)]],
                               cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        samples = run_dir / "samples.jsonl"
        while not samples.exists() or len(samples.read_text().splitlines()) < 2:
            assert job.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        ranks = rank_pids(job.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[0], signal.SIGTERM)  # one rank directly, as scancel would
        job.send_signal(signal.SIGTERM)  # --signal=B:TERM: Slurm signals the batch script (that rank again)
        time.sleep(0.3)
        job.send_signal(signal.SIGTERM)  # again: dropped by the script (a no-op once the job has ended)
        job.wait(timeout=180)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    output = log.read_text()
    assert job.returncode == 0, output[-4000:]
    last = len((run_dir / "samples.jsonl").read_text().splitlines())
    assert [p.name for p in complete_checkpoints(run_dir)] == [f"step-{last}"], output[-4000:]
    assert output.count(f"stopped by SIGTERM after step {last}") == 2, output[-4000:]  # one line per rank
    assert "s after the signal" in output
    assert output.count("passing SIGTERM once to") == 2  # the batch script to srun, the node to its ranks
    assert "passing SIGTERM once to the ranks of pid" in output
    assert "training exited with status 0" in output and "Traceback" not in output
    srun_log = (tmp_path / "srun.log").read_text()
    assert srun_log.count("SIGTERM passed to the task") == 1
    assert "srun --kill-on-bad-exit=1 bash -c forward_signal --to-children accelerate launch" in srun_log
    assert "--signal=B:TERM@" in (REPO / "launch/slurm.sbatch").read_text()
