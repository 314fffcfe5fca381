"""One rank on a Ray node: a plain actor that reports where it runs, checks that its node sees the run's files,
and starts the training process exactly as the deepspeed launcher starts it (``train_ds.py``'s ``main`` in a fresh
Python, with the launcher's rendezvous variables and ``--local_rank``), streaming its output back.

The training process writes to a log file on the node (kept when the rank fails), which the actor follows. It
does not outlive its actor: Ray ends a dead worker's child processes, and where it does not, the training
process gets SIGTERM (``PR_SET_PDEATHSIG``), which pipellm's training answers by saving a checkpoint and stopping.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

TRAIN_COMMAND = [sys.executable, "-u", "-c", "from pipellm.training.distributed import run_as_process; "
                 "from pipellm.training.train import main; run_as_process(main)"]
"""What ``train_ds.py`` runs (it is a script beside the package, not part of it); ``-u`` as the launcher runs it."""
TAIL_LINES = 20
"""The last lines of a failed rank's output the driver shows."""
PR_SET_PDEATHSIG = 1


def file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _die_with_parent() -> None:
    """In the training process before it starts: SIGTERM when the actor that started it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@ray.remote
class RankWorker:
    """A Ray worker that runs one training rank (``max_concurrency=2``: ``stop`` while ``train`` streams)."""

    def __init__(self):
        self.process: subprocess.Popen | None = None

    def where(self) -> dict:
        """This worker's node (id, IP, host name) and the GPUs Ray gave it."""
        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "ip": ray.util.get_node_ip_address(), "host": socket.gethostname(),
                "gpus": sorted(int(gpu) for gpu in ray.get_gpu_ids())}

    def free_port(self) -> int:
        """A port nobody listens on now on this node: the rendezvous port when this worker is rank 0."""
        with socket.socket() as probe:
            probe.bind(("", 0))
            return probe.getsockname()[1]

    def missing_file(self, cwd: str, config: str, config_digest: str, paths: list[str]) -> str | None:
        """What this node lacks of what the driver checked (None: nothing): the working directory, the same config
        file, the model and data files."""
        if not Path(cwd).is_dir():
            return f"the working directory {cwd} does not exist"
        if not Path(config).is_file() or file_digest(config) != config_digest:
            return f"the config file {config} is missing or differs from the caller's"
        return next((f"{path} does not exist" for path in paths if not Path(cwd, path).exists()), None)

    def write_probe(self, path: str) -> str | None:
        """Write the shared-storage probe file ``path`` (its directory created); the error, if any."""
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        except OSError as err:
            return f"cannot write {path}: {err.strerror or err}"
        return None

    def missing_probes(self, paths: list[str]) -> list[str]:
        return [path for path in paths if not Path(path).is_file()]

    def remove(self, path: str) -> None:
        Path(path).unlink(missing_ok=True)

    def train(self, argv: list[str], env: dict[str, str | None], cwd: str, stream_all: bool):
        """Run the training process (``env``: variables to set, or to remove where None); yield its output lines
        (all of them, or with ``stream_all`` false only its ``error:`` lines), then ``{"exit": code, "tail": last
        lines, "log": its log file}``."""
        log_dir = Path(tempfile.gettempdir()) / "pipellm-ray"
        log_dir.mkdir(exist_ok=True)
        log = log_dir / f"rank{env['RANK']}-{os.getpid()}-{int(time.time())}.log"
        environment = {name: value for name, value in {**os.environ, **env}.items() if value is not None}
        with open(log, "wb") as out:
            self.process = subprocess.Popen(TRAIN_COMMAND + argv, cwd=cwd, env=environment, stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, preexec_fn=_die_with_parent)
        tail: list[str] = []
        with open(log, "rb") as follow:
            for line in _follow(follow, self.process):
                tail = (tail + [line])[-TAIL_LINES:]
                if stream_all or line.startswith("error:"):
                    yield line
        code = self.process.returncode
        if code == 0:
            log.unlink()
        yield {"exit": code, "tail": tail, "log": str(log)}

    def stop(self, sig: int) -> None:
        """Send ``sig`` to the training process and its children (SIGTERM: checkpoint and stop; SIGKILL)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)


def _follow(follow, process: subprocess.Popen):
    """The lines written to the open file ``follow`` until ``process`` ends (a progress bar's redraws, ended by
    carriage returns, are lines too)."""
    pending = b""
    while True:
        ended = process.poll() is not None
        chunk = follow.read()
        if chunk:
            *lines, pending = (pending + chunk).replace(b"\r", b"\n").split(b"\n")
            yield from (line.decode(errors="replace") for line in lines if line.strip())
        elif ended:
            break
        else:
            time.sleep(0.2)
    if pending.strip():
        yield pending.decode(errors="replace")
