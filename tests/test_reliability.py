"""A run owns its save path, every failure is one line, nothing is lost or left behind.

* The run lock (``save_path/run.lock``): a live holder refuses a second run with one line naming it, a stale one
  (process gone on this host, no heartbeat from another host) is taken over; through the launcher, a second run
  on a running run's save_path is refused while the first goes on, a rank SIGKILLed mid-training leaves its
  peer with one line naming the stage and the last good checkpoint, and ``python train_ds.py`` without the
  launcher takes the dead run's lock over, removes its partial checkpoints and resumes on one process.
* ``train_ds.py`` / ``train_ds_zero.py`` without the launcher: one process runs, more stop with the launcher
  command; the ZeRO-3 baseline takes the pipeline's YAML (its pipeline keys ignored with a note).
* A checkpoint write that fails for want of disk is one line naming the file; ``latest`` still names the
  previous checkpoint.
* A training script's process ends with its exit code, atexit handlers and output, without finalizing Python.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import REPO
from distributed import free_port
from pipellm.errors import PipellmError
from pipellm.files import HOST
from pipellm.training import run_lock
from pipellm.training.distributed import RankFailure
from pipellm.training.run_lock import LOCK_FILE, LockHolder, RunLock, process_started

DATA = str(REPO / "pipellm" / "assets" / "data" / "sample.jsonl")
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def write_lock(save: Path, holder: LockHolder, heartbeat_age_s: float = 0.0) -> Path:
    save.mkdir(parents=True, exist_ok=True)
    path = save / LOCK_FILE
    path.write_text(json.dumps(dataclasses.asdict(holder)))
    os.utime(path, (time.time() - heartbeat_age_s,) * 2)
    return path


def holder(**changes) -> LockHolder:
    mine = LockHolder(HOST, os.getpid(), process_started(os.getpid()), "2026-01-02T03:04:05", "abc123",
                      "10.0.0.1:29500")
    return dataclasses.replace(mine, **changes)


def test_run_lock_refuses_a_live_run_and_takes_over_a_stale_one(tmp_path, monkeypatch, capsys):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    save = tmp_path / "save"
    cfg = types.SimpleNamespace(save_path=str(save), lock_stale_after_s=600.0)
    # A live run of this host (this very process), and one of another host with a fresh heartbeat.
    for live in (holder(), holder(host="elsewhere", pid=1, pid_started=1.0)):
        lock = write_lock(save, live, heartbeat_age_s=10)
        with pytest.raises(PipellmError) as refused, RunLock.hold(cfg, "def456"):
            pass
        assert str(refused.value) == (
            f"`save_path` {save} is in use by another run (host {live.host}, pid {live.pid}, started "
            f"2026-01-02T03:04:05, config abc123; {lock}): wait for it to end or give this run another save_path; "
            f"if that run is gone, delete {lock}")
        assert LockHolder(**json.loads(lock.read_text())) == live  # the holder's lock is left alone
        # The other ranks of the holder's own run (same rendezvous) pass; those of another run stop too.
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
        monkeypatch.setenv("MASTER_PORT", "29500")
        with RunLock.hold(cfg, "abc123"):
            pass
        monkeypatch.setenv("MASTER_PORT", "29501")
        monkeypatch.setattr(run_lock, "TAKEOVER_WAIT_S", 0.0)  # no rank 0 of this run is coming to take it over
        with pytest.raises(RankFailure, match="is in use by another run"), RunLock.hold(cfg, "def456"):
            pass
        monkeypatch.delenv("RANK")

    # A crashed run's lock on another host looks live to a rank that cannot check its pid: the rank waits for its
    # own rank 0 to take the lock over instead of refusing.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29502")
    monkeypatch.setattr(run_lock, "TAKEOVER_WAIT_S", 30.0)
    crashed = holder(host="elsewhere", pid=1, pid_started=1.0)
    lock = write_lock(save, crashed, heartbeat_age_s=10)
    ours = dataclasses.replace(crashed, host=HOST, rendezvous="10.0.0.1:29502")
    # Rank 0 replaces the lock in one rename (what the rank reads is always a whole file).
    taker = threading.Timer(0.5, lambda: os.replace(write_lock(tmp_path / "rank0", ours), lock))
    taker.start()
    with RunLock.hold(cfg, "abc123"):
        pass
    taker.join()
    lock.unlink()
    monkeypatch.delenv("RANK")

    # Gone: a pid of this host that is another process now, or another host's lock without a heartbeat.
    # The heartbeat's age is read when the lock is taken: 700 s, or a little more on a slow machine.
    for stale, why in ((holder(pid_started=1.0), r"its process is gone"),
                       (holder(host="elsewhere", pid=1), r"no heartbeat for 7\d\ds > lock_stale_after_s=600")):
        lock = write_lock(save, stale, heartbeat_age_s=700)
        with RunLock.hold(cfg, "def456"):
            assert re.search(rf"pipellm: took over {re.escape(str(lock))} from a run that is gone "
                             rf"\({re.escape(stale.describe())}: {why}\)", capsys.readouterr().err)
            taken = LockHolder(**json.loads(lock.read_text()))
            assert (taken.host, taken.pid, taken.config_hash) == (HOST, os.getpid(), "def456")
        assert not lock.exists()  # released at the end

    # A run that fails still releases the lock; a save_path it created and left empty goes too.
    fresh = tmp_path / "fresh"
    with pytest.raises(PipellmError), RunLock.hold(types.SimpleNamespace(save_path=str(fresh),
                                                                         lock_stale_after_s=600.0), "def456"):
        assert (fresh / LOCK_FILE).is_file()
        raise PipellmError("bad data")
    assert not fresh.exists()



class FakeEngine:
    """Writes a 1 MB file into each checkpoint, then fails with ``failure`` if set (as a full disk would)."""

    failure: BaseException | None = None

    def save(self, save_dir: Path, tag: str) -> None:
        (save_dir / tag).mkdir(exist_ok=True)  # as DeepSpeed does
        (save_dir / tag / "layer_00-model_states.pt").write_bytes(b"\0" * 10**6)
        if isinstance(self.failure, OSError):
            self.failure.filename = str(save_dir / tag / "layer_00-model_states.pt")
        if self.failure is not None:
            raise self.failure

    def resume_state(self) -> dict:
        return {}


@pytest.fixture
def one_process_group(monkeypatch):
    from pipellm.training.distributed import close_process_group, init_process_group

    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(name, value)
    init_process_group(60)
    yield
    close_process_group()


def test_a_save_out_of_disk_is_one_line_and_latest_stays(tmp_path, one_process_group, monkeypatch, capsys):
    import torch

    from pipellm.config import EarlyStopping
    from pipellm.training.checkpointer import Checkpointer
    from pipellm.training.distributed import RankFailure
    from pipellm.training.early_stopping import EarlyStoppingState

    save, model = tmp_path / "save", tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    # Partial saves of runs that are gone (another host's, an older pipellm's) go when a run starts.
    for leftover in ("global_step3.tmp-otherhost-1", "global_step3.tmp"):
        (save / leftover).mkdir(parents=True)
    cfg = types.SimpleNamespace(save_path=str(save), model_path=str(model), keep_last_n=None)
    checkpointer, engine = Checkpointer(cfg, None), FakeEngine()
    stopping = EarlyStoppingState.from_config(EarlyStopping())
    assert not any(save.iterdir())
    assert f"pipellm: removed {save}/global_step3.tmp, a partial checkpoint of a run that is gone" in \
        capsys.readouterr().err
    checkpointer.save(2, engine, stopping)
    assert (save / "latest").read_text() == "global_step2" and (save / "global_step2" / "config.json").is_file()

    target = f"{save}/global_step4/layer_00-model_states.pt"
    full = (rf"no space left on device writing {re.escape(target)}; free \d+\.\d GB \(the output needs about 0\.0 GB\) "
            rf"or change save_path")
    for failure, message in ((OSError(errno.ENOSPC, "No space left on device"), full),
                             (OSError(errno.EROFS, "Read-only file system"),
                              f"read-only file system: cannot write {re.escape(target)}; change save_path")):
        engine.failure = failure
        with pytest.raises(RankFailure, match=f"^{message}$"):
            checkpointer.save(4, engine, stopping)
        assert (save / "latest").read_text() == "global_step2"
    # torch's writer does not pass the OSError on when the disk fills.
    engine.failure = None
    monkeypatch.setattr(torch, "save", lambda *args, **kwargs: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 512 vs 448")))
    with pytest.raises(RankFailure, match=rf"^no space left on device writing {save}/global_step4; free "):
        checkpointer.save(4, engine, stopping)
    assert checkpointer.last_good() == f"the last good checkpoint is {save}/global_step2 ({save}/latest names it)"
    # Any other failure is a bug, shown as it is.
    monkeypatch.setattr(torch, "save", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="^a bug$"):
        checkpointer.save(4, engine, stopping)


def train_config(path: Path, model: Path, save: Path, dims: list[int], parts, **overrides) -> Path:
    config = {"model_path": str(model), "save_path": str(save), "data_path": DATA, "max_seq_len": 64,
              "log_steps": 1, "seed": 3, "use_tensorboard": False,
              "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": dims}, "parts": parts},
              "train_batch_size": 4, "train_micro_batch_size_per_gpu": 2,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, **overrides}
    path.write_text(yaml.safe_dump(config))
    return path


def without_launcher(*args: str) -> subprocess.CompletedProcess:
    """``python train_ds.py ...`` as a user types it: no launcher variables."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def command_line(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # a helper process that ended meanwhile
        return ""


def records(save: Path) -> list[dict]:
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


def test_a_run_owns_its_save_path_and_a_killed_rank_is_one_line(tmp_path, tiny_pp_model):
    pp, save = tiny_pp_model[1], tmp_path / "save"
    first = train_config(tmp_path / "first.yml", pp, save, [2, 1], [3, 3], n_epochs=100, save_steps=2,
                         data_cache_dir=str(tmp_path / "cache"))
    log = tmp_path / "first.log"  # a file, not a pipe: a full pipe would stall the run
    with log.open("w") as out:
        launch = subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                                   "--master_port", str(free_port()), "train_ds.py", "--config", str(first)],
                                  cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (save / "latest").is_file():
            assert time.time() < deadline and launch.poll() is None, "the first run did not save a checkpoint"
            time.sleep(0.2)
        commands = {p: command_line(p) for p in psutil.Process(launch.pid).children(recursive=True)}
        ranks = {int(re.search(r"--local_rank=(\d)", command).group(1)): p for p, command in commands.items()
                 if "--local_rank=" in command}
        lock = json.loads((save / LOCK_FILE).read_text())
        assert (lock["host"], lock["pid"]) == (HOST, ranks[0].pid)

        # A second run on the same save_path (a single process, without the launcher) stops at start-up.
        second = train_config(tmp_path / "second.yml", pp, save, [1, 1], [6], max_steps=2)
        refused = without_launcher("train_ds.py", "--config", str(second))
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert refused.stderr.strip().splitlines()[-1].startswith(
            f"error: `save_path` {save} is in use by another run (host {HOST}, pid {ranks[0].pid}, started "), \
            refused.stderr[-3000:]
        # ... and the first run goes on: more steps, its lock and checkpoints in place.
        deadline = time.time() + 300  # the refused run's start-up took its own time
        lines = (save / "metrics.jsonl").read_text().count("\n")  # the run may be writing a line: count them
        while (save / "metrics.jsonl").read_text().count("\n") < lines + 2:
            assert time.time() < deadline and launch.poll() is None, "the first run stopped"
            time.sleep(0.2)
        assert json.loads((save / LOCK_FILE).read_text()) == lock
        assert (save / (save / "latest").read_text()).is_dir()

        # Stage 0 is killed: stage 1 says so in one line, with the last good checkpoint, and exits.
        ranks[0].send_signal(signal.SIGKILL)
        ranks[1].wait(timeout=60)
        launch.wait(timeout=120)
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
    output = log.read_text()
    lost = re.search(rf"error: pipeline stage 1 \(rank 1, host {re.escape(HOST)}\) lost its connection "
                     rf"(?:in (.+?) of step \d+|between steps): (.+?) went away \(killed, out of memory or crashed: "
                     rf"see its log\); the last good checkpoint is {re.escape(str(save))}/global_step(\d+) "
                     rf"\({re.escape(str(save))}/latest names it\)\n", output)
    assert lost, output[-3000:]
    assert lost.group(2).startswith("stage 0 (rank 0) at 127.0.0.1"), lost.group(0)
    assert "Traceback" not in output, output[-3000:]

    # The same run resumed by hand on one process: the dead run's lock is taken over, training goes on.
    step = int((save / "latest").read_text().removeprefix("global_step"))
    resumed = train_config(tmp_path / "resumed.yml", pp, save, [1, 1], [6], max_steps=step + 2, resume="auto",
                           resume_weights_only=True, data_cache_dir=str(tmp_path / "cache"))
    result = without_launcher("train_ds.py", "--config", str(resumed))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"pipellm: took over {save / LOCK_FILE} from a run that is gone (host {HOST}, pid {ranks[0].pid}, " \
           f"started " in result.stderr and ": its process is gone)" in result.stderr, result.stderr[-3000:]
    assert f"pipellm: resumed from {save}/global_step{step} at step {step}" in result.stderr, result.stderr[-3000:]
    assert [r["step"] for r in records(save)][-3:] == [step, step + 1, step + 2]
    assert (save / "latest").read_text() == f"global_step{step + 2}"
    assert not (save / LOCK_FILE).exists() and not list(save.glob("global_step*.tmp*"))


@pytest.mark.parametrize("script, dims, parts", [("train_ds.py", [2, 1], [3, 3]),
                                                 ("train_ds_zero.py", [1, 2], "uniform")])
def test_without_the_launcher_a_larger_grid_says_how_to_start_it(script, dims, parts, tmp_path, tiny_pp_model,
                                                                 monkeypatch, capsys):
    from pipellm.training import train, zero

    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    model = tiny_pp_model[1] if script == "train_ds.py" else tiny_pp_model[0]
    config = train_config(tmp_path / "c.yml", model, tmp_path / "save", dims, parts)
    with pytest.raises(SystemExit) as exit_info:
        (train if script == "train_ds.py" else zero).main(["--config", str(config)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {config}: `model_topo.process_topology.dims` {dims} needs 2 processes: run under the deepspeed "
        f"launcher, `deepspeed --num_gpus 2 {script} --config {config}` (on several nodes `--hostfile HOSTFILE`)")
    assert "WORLD_SIZE" not in os.environ and not (tmp_path / "save").exists()


def test_zero3_takes_the_pipeline_yaml(tmp_path, tiny_pp_model, monkeypatch, capsys):
    from pipellm.training.zero import prepare

    hf_dir = tiny_pp_model[0]
    config = train_config(tmp_path / "pp.yml", hf_dir, tmp_path / "save", [2, 1], [3, 3], max_steps=2,
                          train_batch_size=8, data_cache_dir=str(tmp_path / "cache"))
    note = (f"pipellm zero3: note: ignored the pipeline keys `model_topo.process_topology.dims` [2, 1] and "
            f"`model_topo.parts` [3, 3] of {config}; ZeRO-3 runs data parallel over the ")
    # Under the launcher: its world size is the data-parallel degree, the file's global batch stays.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg, _ = prepare(["--config", str(config)])
    assert capsys.readouterr().err.strip() == note + "2 process(es) started (dims [1, 2])"
    assert cfg.model_topo.process_topology.dims == [1, 2] and cfg.model_topo.parts == "uniform"
    assert (cfg.global_batch_size, cfg.micro_batch_size, cfg.gradient_accumulation_steps) == (8, 2, 2)
    # Without the launcher: one process trains.
    result = without_launcher("train_ds_zero.py", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert note + "1 process(es) started (dims [1, 1])" in result.stderr
    # A pipeline schedule is a pipeline key too: noted, not silently dropped.
    schedule_only = train_config(tmp_path / "zb.yml", hf_dir, tmp_path / "save2", [1, 1], "uniform",
                                 pipeline_schedule="zb-h1", data_cache_dir=str(tmp_path / "cache"))
    prepare(["--config", str(schedule_only)])
    assert capsys.readouterr().err.strip() == (
        f"pipellm zero3: note: ignored the pipeline keys `pipeline_schedule: zb-h1` of {schedule_only}; ZeRO-3 runs "
        f"data parallel over the 2 process(es) started (dims [1, 2])")
    assert [r["step"] for r in records(tmp_path / "save")] == [1, 2]


def test_a_training_script_ends_its_process_without_finalizing_python():
    """``run_as_process`` (``train_ds.py``, ``train_ds_zero.py``, Ray's ranks): the script's exit code, its atexit
    handlers run and its output flushed, and no interpreter finalization, during which a collective's worker
    thread releasing a tensor aborted finished runs (exit code -6)."""
    script = """if True:
        import atexit, sys
        from pipellm.training.distributed import run_as_process

        class Finalized:
            def __del__(self):
                print("finalized", flush=True)

        kept = Finalized()  # a module global: released only when the interpreter finalizes
        atexit.register(print, " atexit ran")

        def main():
            print("main ran", end="")  # not flushed by main
            sys.exit(2)

        run_as_process(main)
    """
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (2, "main ran atexit ran\n", "")
