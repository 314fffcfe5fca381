"""``python -m pipellm.ray`` on a local Ray cluster of two nodes: two raylets on this machine (2 CPUs each), the
second in its own mount namespace where a tmpfs hides one directory, as a node that does not mount the shared
storage would. 2 stages x 1 replica train exactly as the deepspeed launcher does, until a killed rank ends the
run with the peer-lost line; 2 x 2 spread over both nodes train as it does too; a bad config fails before Ray; a
``save_path`` one node does not share is one line. One Ray run per test: each costs about a launcher run."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from conftest import REPO
from distributed import free_port
from launches import metrics, write_config

from pipellm.config import load_config
from pipellm.ray import launch

COMPARED = ("step", "epoch", "loss", "lr", "grad_norm", "tokens")
"""The figures of a metrics record that do not depend on timing."""


def start_node(args: list[str], log: Path, hide: Path | None = None) -> subprocess.Popen:
    """``ray start --block`` (its own session, so that every process it starts can be ended); ``hide``: a
    directory this node sees as an empty tmpfs of its own."""
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--node-ip-address=127.0.0.1", "--num-cpus=2",
               "--disable-usage-stats", "--block", *args]
    if hide is not None:
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount -t tmpfs pipellm-test "$0" && exec "$@"', str(hide), *command]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    hidden = root / "node_local"
    hidden.mkdir()
    port = free_port()
    nodes = [start_node(["--head", f"--port={port}", "--include-dashboard=false"], root / "head.log"),
             start_node([f"--address=127.0.0.1:{port}"], root / "node2.log", hide=hidden)]
    try:
        deadline = time.monotonic() + 120
        while True:  # the head's GCS accepts connections: a driver can join
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline and nodes[0].poll() is None, (root / "head.log").read_text()
            time.sleep(0.2)
        yield SimpleNamespace(address=f"127.0.0.1:{port}", hidden=hidden, root=root,
                              env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    finally:
        for node in nodes:
            node.send_signal(signal.SIGTERM)  # `ray start --block` ends the processes it started
        for node in nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(60)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)  # whatever of its session is left
        current = Path("/tmp/ray/ray_current_cluster")  # else a later `ray.init()` would try to join this one
        with contextlib.suppress(OSError):
            if current.read_text().strip().endswith(f":{port}"):
                current.unlink()


def ray_command(cluster, config: Path) -> list[str]:
    return [sys.executable, "-m", "pipellm.ray", "--config", str(config), "--address", cluster.address,
            "--gpus-per-worker", "0"]


def train_on_ray(cluster, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(ray_command(cluster, config), cwd=REPO, env=cluster.env, capture_output=True, text=True,
                          timeout=600)


def training_process(config: Path, rank: int) -> psutil.Process:
    """The training process of ``rank`` started for ``config`` (a child of a Ray worker, not of the driver)."""
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if str(config) in process.cmdline() and process.environ().get("RANK") == str(rank):
                return process
    raise AssertionError(f"no training process of rank {rank}")


def compared(save: Path) -> list[dict]:
    return [{key: record[key] for key in COMPARED} for record in metrics(save)]


def test_two_stages_train_exactly_as_under_the_launcher_until_a_rank_is_killed(cluster, tmp_path, tiny_pp_model,
                                                                                launcher_run_2x1):
    # The launcher's config, but a run long enough to kill a rank in (a constant learning rate: the same steps).
    config = write_config(tmp_path / "c.yml", tiny_pp_model[1], tmp_path / "save", [2, 1], n_epochs=100,
                          max_steps=10**6)
    driver = subprocess.Popen(ray_command(cluster, config), cwd=REPO, env=cluster.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        log, deadline = tmp_path / "save" / "metrics.jsonl", time.monotonic() + 300
        while not (log.exists() and len(log.read_text().splitlines()) >= 4):
            assert time.monotonic() < deadline and driver.poll() is None, "training did not start"
            time.sleep(0.2)
        training_process(config, 1).kill()
        _, err = driver.communicate(timeout=120)
    finally:
        driver.kill()
    # The same processes as the launcher's, with the same rendezvous: the same figures, bit for bit.
    assert compared(tmp_path / "save")[:4] == compared(launcher_run_2x1)
    # Rank 0's log reaches the caller: its step lines.
    assert re.search(r"^step 4 \| epoch 0 \| loss ", err, re.M), err[-3000:]
    assert driver.returncode == 2, err[-3000:]  # rank 0's own exit code: the peer-lost error's
    # Stage 0 names its lost peer, as under the launcher (test_reliability); the driver names the dead rank.
    assert re.search(r"^error: pipeline stage 0 \(rank 0, host .+\) lost its connection (?:in .+? of step \d+|between "
                     r"steps): stage 1 \(rank 1\)(?: at \S+)? went away ", err, re.M), err[-3000:]
    assert re.search(r"^pipellm ray: rank 1 \(stage 1, replica 0, node .+\) exited with code -9", err, re.M), \
        err[-3000:]
    for log in re.findall(r"; its log: (\S+)", err):  # the failed ranks' logs, kept on their node
        Path(log).unlink()


def test_two_stages_two_replicas_over_two_nodes_train_as_under_the_launcher(cluster, tmp_path, tiny_pp_model,
                                                                            launcher_run_2x1):
    config = write_config(tmp_path / "c.yml", tiny_pp_model[1], tmp_path / "save", [2, 2])
    run = train_on_ray(cluster, config)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pipellm ray: 4 ranks on 2 node(s)" in run.stderr
    # The same global batch over 2 replicas: the launcher's curve (as its own 2 x 2 run gives, test_scale_out).
    ours, theirs = metrics(tmp_path / "save"), metrics(launcher_run_2x1)
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in theirs], rel=1e-5)
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in theirs]
    # Rank 0's log reaches the caller, every step and the end; only rank 0's: what every rank prints at start-up
    # appears once.
    assert len(re.findall(r"^step \d \| epoch 0 \| loss ", run.stderr, re.M)) == 4, run.stderr[-3000:]
    assert "pipellm: done, 4 steps" in run.stderr
    assert run.stderr.count("SEED_LAYERS=") == 1, run.stderr[-3000:]


def test_a_save_path_one_node_does_not_see_is_one_line(cluster, tiny_pp_model):
    if os.geteuid() != 0:
        pytest.fail("the second node's own mount namespace needs root (unshare --mount)")
    save = cluster.hidden / "save"
    config = write_config(cluster.root / "hidden.yml", tiny_pp_model[1], save, [2, 2])
    run = train_on_ray(cluster, config)
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    # Rank 0's node and the other node each miss the probe files the other wrote; the first reader is rank 0.
    assert len(errors) == 1 and re.fullmatch(
        rf"error: `save_path` {save} is not shared: rank 0 \(stage 0, replica 0, node .+\) does not see "
        rf"{save}/\.pipellm-ray-probe-\w+-rank2, written by rank 2 \(stage 1, replica 0, node .+\); put save_path "
        r"on storage every node mounts at the same path .*", errors[0]), run.stderr[-3000:]
    assert "pipellm data:" not in run.stderr  # no training started
    assert not list(save.glob(".pipellm-ray-probe-*"))  # the probes are removed


@pytest.mark.parametrize("case", ["unknown key", "workers", "no model"])
def test_a_bad_config_fails_before_ray(case, tmp_path, tiny_pp_model, monkeypatch, capsys):
    overrides = {"unknown key": {"max_step": 3}, "workers": {}, "no model": {"model_path": str(tmp_path)}}[case]
    config = write_config(tmp_path / "c.yml", tiny_pp_model[1], tmp_path / "save", [2, 1], **overrides)
    monkeypatch.setattr(launch, "launch", lambda *args: pytest.fail("reached Ray with a bad config"))
    with pytest.raises(SystemExit) as exit:
        launch.main(["--config", str(config), "--gpus-per-worker", "0", *["--num-workers", "4"] * (case == "workers")])
    assert exit.value.code == 2
    expected = {"unknown key": "unknown key `max_step`", "workers": "--num-workers 4 but",
                "no model": f"no pipeline layer files (layer_00-model_states.pt, ...) in {tmp_path}"}[case]
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err, err


def test_ranks_follow_the_launchers_order_and_environment(tmp_path, tiny_pp_model):
    # Bundles as Ray may place them: node b got bundles 0 and 2, node a 1 and 3, GPUs in any order.
    places = [{"node_id": "b", "gpus": [3], "ip": "10.0.0.2", "host": "b"},
              {"node_id": "a", "gpus": [1], "ip": "10.0.0.1", "host": "a"},
              {"node_id": "b", "gpus": [0], "ip": "10.0.0.2", "host": "b"},
              {"node_id": "a", "gpus": [0], "ip": "10.0.0.1", "host": "a"}]
    order = launch.rank_order(places)
    assert order == [2, 0, 3, 1]  # node b first (bundle 0), each node's workers consecutive, by GPU
    in_rank_order = [places[i] for i in order]
    envs = launch.rank_environments(in_rank_order, "10.0.0.2", 29500)
    assert [(e["RANK"], e["LOCAL_RANK"], e["CROSS_RANK"]) for e in envs] == [
        ("0", "0", "0"), ("1", "1", "0"), ("2", "0", "1"), ("3", "1", "1")]
    assert {e["CUDA_VISIBLE_DEVICES"] for e in envs[:2]} == {"0,3"}  # LOCAL_RANK k drives the k-th GPU
    assert all(e["WORLD_SIZE"] == "4" and e["LOCAL_SIZE"] == "2" and e["MASTER_ADDR"] == "10.0.0.2" for e in envs)
    # CPU workers of one node look alike: they still get a local rank each.
    cpu = launch.rank_environments([{"node_id": "a", "gpus": []}] * 2, "10.0.0.1", 29500)
    assert [(e["LOCAL_RANK"], e["CUDA_VISIBLE_DEVICES"]) for e in cpu] == [("0", ""), ("1", "")]
    cfg = load_config(write_config(tmp_path / "c.yml", tiny_pp_model[1], tmp_path / "s", [2, 2]))
    assert launch.describe(cfg, 1, in_rank_order[1]) == "rank 1 (stage 0, replica 1, node b (10.0.0.2))"
    cfg.model_topo.process_topology.axes = ["data", "pipe"]
    assert launch.describe(cfg, 1, in_rank_order[1]) == "rank 1 (stage 1, replica 0, node b (10.0.0.2))"


def test_the_exit_code_is_the_trainings():
    def code(*codes):
        ranks = launch.Ranks(None, None, list(codes), [])
        ranks.codes = dict(enumerate(codes))
        return ranks.exit_code()

    assert code(0, 0, 0) == 0
    assert code(2, 2, 2) == 2  # a PipellmError on every rank
    assert code(2, -9) == 2  # rank 0's own code: its peer-lost error
    assert code(0, -9) == 128 + 9  # a signal, as a shell reports it
    assert code(None, 2) == 2 and code(None, None) == 1  # a Ray worker that died has no code
