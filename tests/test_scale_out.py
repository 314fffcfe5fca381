"""Scale-out, tested on one machine: two launcher invocations play two nodes (``--no_ssh --node_rank``), a
mismatched config on one node fails at start-up naming the rank, a hung rank ends the run with an error
naming the stage instead of a silent hang, and a run destroys the process group it started."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch.distributed
from pipellm.pipeline.deepspeed_compat import instruction_names

from conftest import REPO
from distributed import free_port
from launches import launcher, losses, write_config
from pipellm.training.distributed import run_owns_process_group
from pipellm.errors import PipellmError


def run_two_nodes(tmp_path, configs):
    """Start one launcher per "node" (2 processes each) without ssh; return their (returncode, output)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    port = free_port()
    procs = [subprocess.Popen(launcher(config, "--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2",
                                       "--node_rank", str(rank), "--master_addr", "127.0.0.1", port=port),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank, config in enumerate(configs)]
    return [(p.wait(timeout=600), p.stdout.read()) for p in procs]


def test_two_nodes_train_like_one(tmp_path, tiny_pp_model, launcher_run_2x1):
    two = write_config(tmp_path / "two.yml", tiny_pp_model[1], tmp_path / "two", [2, 2])
    results = run_two_nodes(tmp_path, [two, two])
    assert all(code == 0 for code, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    # 2 stages x 2 replicas over two "nodes" = the same global batch, so the same loss curve.
    assert losses(tmp_path / "two") == pytest.approx(losses(launcher_run_2x1), rel=1e-5)


def test_mismatched_config_on_one_node_fails_fast(tmp_path, tiny_pp_model):
    pp = tiny_pp_model[1]
    good = write_config(tmp_path / "good.yml", pp, tmp_path / "save", [2, 2])
    other = write_config(tmp_path / "other.yml", pp, tmp_path / "save", [2, 2], seed=4)
    (code0, out0), (code1, out1) = run_two_nodes(tmp_path, [good, other])
    assert code0 != 0 and code1 != 0
    assert "error: rank 2 (host " in out0 and "config hash" in out0, out0[-3000:]


def test_hung_rank_ends_with_error_naming_the_stage(tmp_path, tiny_pp_model):
    config = write_config(tmp_path / "c.yml", tiny_pp_model[1], tmp_path / "save", [2, 1], n_epochs=100,
                          max_steps=10**6, collective_timeout_s=10)
    launch = subprocess.Popen(launcher(config, "--num_gpus", "2", port=free_port()), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "save" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert time.time() < deadline and launch.poll() is None, "training did not start"
        time.sleep(0.5)
    stage1 = next(p for p in psutil.Process(launch.pid).children(recursive=True)
                  if "--local_rank=1" in " ".join(p.cmdline()))
    os.kill(stage1.pid, signal.SIGSTOP)  # hung, not dead: nothing tells the other rank
    lines, reported = [], threading.Event()

    def read_output():
        for line in launch.stdout:
            lines.append(line)
            if "stalled for more than" in line:
                reported.set()

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        reported.wait(timeout=120)
        # The launcher answers stage 0's exit with SIGTERM, which a stopped process never handles: it would wait
        # 30 s before its SIGKILL. What is tested is stage 0's report, so the stopped rank is killed now.
        stage1.kill()
        launch.wait(timeout=120)
        reader.join(timeout=60)
    finally:
        for p in psutil.Process(os.getpid()).children(recursive=True):
            p.kill()
    output = "".join(lines)
    assert launch.returncode != 0
    assert "error: pipeline stage 0 (rank 0, host " in output, output[-3000:]
    # Where stage 0 blocks depends on when stage 1 stopped: handing it activations, waiting for its gradients,
    # the optimizer step's gradient-norm all-reduce, DeepSpeed's loss all-reduce after the schedule, or pipellm's
    # all-reduces of the SIGTERM flag and the peak memory. The error names one of these operations, and the step.
    stalled_in = re.search(r"stalled for more than collective_timeout_s=10s in (.+?) of step \d+", output)
    assert stalled_in, output[-3000:]
    instructions = instruction_names()
    operations = (instructions | {f"the step's bookkeeping after {name}" for name in instructions}
                  | {"the start of the step", "the all-reduce of the SIGTERM flag",
                     "the all-reduce of the stages' peak memory"})
    assert stalled_in.group(1) in operations, output[-3000:]


def test_a_run_destroys_the_process_group_it_started():
    # The run's orderly end on every rank. It does not stop gloo's threads (DeepSpeed keeps the groups alive), so
    # the process then ends through ``run_as_process``, not interpreter shutdown (tests/test_reliability.py).
    def start():
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                             world_size=1)

    with run_owns_process_group():
        start()
    assert not torch.distributed.is_initialized()
    with pytest.raises(PipellmError), run_owns_process_group():
        start()
        raise PipellmError("the same error on every rank")
    assert not torch.distributed.is_initialized()
    # Any other exception: a peer may be inside a collective, so the group is left to process exit.
    with pytest.raises(RuntimeError), run_owns_process_group():
        start()
        raise RuntimeError("one rank only")
    assert torch.distributed.is_initialized()
    # A group that existed before the run belongs to its creator.
    with run_owns_process_group():
        pass
    assert torch.distributed.is_initialized()
    torch.distributed.destroy_process_group()


def test_a_stall_finishes_the_gpu_profile_before_the_exit(tmp_path):
    # The stall exit skips atexit: ``before_exit`` is what still puts the profile's CSV in place.
    script = f"""
import time
from pathlib import Path
from pipellm.training.distributed import StallWatchdog
class Engine:
    _INSTRUCTION_MAP = {{}}
watchdog = StallWatchdog(Engine(), 1, 0.5, before_exit=lambda: Path({str(tmp_path / "finished")!r}).touch())
with watchdog.watch_step(7):
    time.sleep(30)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "RANK": "3"})
    assert run.returncode == 2, run.stderr
    assert "error: pipeline stage 1 (rank 3, host " in run.stderr and "in the start of the step of step 7" \
        in run.stderr, run.stderr
    assert (tmp_path / "finished").exists()
