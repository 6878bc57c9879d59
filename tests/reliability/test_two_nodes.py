"""Two nodes for real: two ``accelerate launch`` invocations on this machine, ``--num_machines 2
--machine_rank 0|1 --main_process_ip 127.0.0.1`` with the two-node Accelerate configs (one process per
"node", gloo on CPU), sharing one run directory as a cluster's shared filesystem would.

Under ZeRO-3 and FSDP2: both nodes train, checkpoint and exit 0; then both resume from a checkpoint and
the steps after it have exactly the losses they had the first time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
from fault_runs import FAULTY_TRAIN, REPO, free_port

from dist_audio.train.checkpoint import complete_checkpoints


def launch_two_nodes(run, accelerate_config: str, *extra: str, timeout: float = 600) -> list[str]:
    """Run both nodes to the end; returns their outputs, asserting each launcher exited 0."""
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "DIST_AUDIO_STEP_LOG": str(run.step_log)}
    nodes = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                               str(REPO / "configs/accelerate" / accelerate_config), "--num_machines", "2",
                               "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip",
                               "127.0.0.1", "--main_process_port", port, str(FAULTY_TRAIN), *run.args(*extra)],
                              cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
             for rank in (0, 1)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=timeout)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank}:\n{output[-3000:]}"
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("accelerate_config", ["two_node_zero3.yaml", "two_node_fsdp.yaml"])
def test_two_nodes_train_checkpoint_and_resume(make_run, accelerate_config):
    run = make_run("two-nodes", "train.checkpoint_every=2", "train.keep_last=3")
    first = launch_two_nodes(run, accelerate_config, "--set", "train.max_steps=4")
    assert run.exit_codes() == {0: 0, 1: 0}
    assert [p.name for p in complete_checkpoints(run.run_dir)] == ["step-2", "step-4"]
    assert "world size 2" in first[0]
    before = dict(run.losses())
    assert sorted(before) == [1, 2, 3, 4]

    shutil.rmtree(run.run_dir / "checkpoints" / "step-4")  # resume from step-2: steps 3 and 4 run again
    run.step_log.unlink()
    resumed = launch_two_nodes(run, accelerate_config, "--set", "train.max_steps=6", "--resume", "auto")
    assert f"resumed from {run.run_dir / 'checkpoints' / 'step-2'}" in resumed[0]
    after = dict(run.losses())
    assert sorted(after) == [3, 4, 5, 6]
    assert after[3] == before[3] and after[4] == before[4]
    assert [p.name for p in complete_checkpoints(run.run_dir)] == ["step-2", "step-4", "step-6"]
