"""Guards for runs over several processes and nodes: the same run everywhere, and no silent hangs.

* ``verify_same_run`` — before training, every rank compares pipellm's version, a hash of the resolved config
  and the data key with rank 0's. Nodes with different code, config or data fail at start-up with the rank and
  host that differ, instead of training on a silently inconsistent state (or hanging in a mismatched collective).
* ``rendezvous_without_launcher`` — ``python train_ds.py`` without a launcher runs one process, or says how to
  start more.
* ``init_process_group`` — the process group on this rank's device (NCCL on GPUs, gloo on CPU), without leaking
  DeepSpeed's CPU shared-memory buffers.
* ``run_owns_process_group`` — the orderly end of a run: the process group is destroyed on every rank.
* ``run_as_process`` — a script whose process ran collectives ends without finalizing the interpreter, which could
  abort a finished run ("terminate called without an active exception", exit code -6; see there).
* ``StallWatchdog`` — a pipeline operation that does not complete within ``collective_timeout_s`` ends the run
  with one line naming the stage, rank, host, step and operation, instead of a silent hang; ``StepWatch`` (its
  base, and the ZeRO engine's watch) turns a peer's death (gloo's or NCCL's "connection closed") into one line.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import os
import re
import socket
import sys
import threading
import time
from typing import Callable, NoReturn

import torch

import pipellm
from pipellm.config import TrainConfig
from pipellm.errors import PipellmError


def init_process_group(timeout_s: float) -> None:
    """Start the process group: NCCL on this rank's GPU (``LOCAL_RANK``), gloo on CPU; ``timeout_s`` for collectives.

    On CPU, DeepSpeed's shared-memory all-reduce creates a 66 MiB ``/dev/shm`` buffer per rank and never unlinks
    it, so every CPU run leaked memory until reboot (hundreds of runs filled a 24 GB machine). Every rank opens
    all its peers' buffers during initialisation; after a barrier the names are no longer needed, so each rank
    unlinks its own: the memory stays mapped while the processes live and is freed when they exit, killed or not.
    """
    import deepspeed
    import deepspeed.comm as dist

    on_gpu = torch.cuda.is_available()
    if on_gpu:  # before any NCCL collective, or every rank would use GPU 0
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo",
                               timeout=datetime.timedelta(seconds=timeout_s), verbose=False)
    if not on_gpu:
        dist.barrier()
        # The name DeepSpeed's csrc/cpu/comm/shm.cpp gives this rank's buffer.
        name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/{name}")


MPI_WORLD_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
"""Set by MPI launchers, whose ranks DeepSpeed discovers itself."""


def rendezvous_without_launcher(cfg: TrainConfig, script: str) -> None:
    """A run started without a launcher (no ``WORLD_SIZE``, no MPI world): a one-process grid runs on its own,
    with the rendezvous variables the launcher would set (a free local port); a larger one stops with the
    launcher command that starts ``script`` on it."""
    if "WORLD_SIZE" in os.environ or any(name in os.environ for name in MPI_WORLD_SIZE_VARIABLES):
        return
    processes = cfg.pipe_degree * cfg.data_degree
    if processes > 1:
        raise PipellmError(f"{cfg.source}: `model_topo.process_topology.dims` {cfg.model_topo.process_topology.dims} "
                           f"needs {processes} processes: run under the deepspeed launcher, `deepspeed --num_gpus "
                           f"{processes} {script} --config {cfg.source}` (on several nodes `--hostfile HOSTFILE`)")
    with socket.socket() as probe:  # a port nobody listens on now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def close_process_group() -> None:
    """Destroy the process group, if any, while the interpreter is fully alive."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def run_owns_process_group():
    """Around a run that starts the process group: destroy it when the run returns or raises ``PipellmError``.

    Both end a run the same way on every rank; after any other exception a peer may still be inside a
    collective, where an NCCL destroy could wait for it, so the process exits without. A group that existed
    before the run (a notebook's, a test harness's) belongs to its creator and is left alone.
    """
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    try:
        yield
    except PipellmError:
        if not had_group:
            close_process_group()
        raise
    if not had_group:
        close_process_group()


def run_as_process(main: Callable[[], None]) -> NoReturn:
    """Run ``main`` as this process's whole life (a training script's rank), then end the process without
    finalizing the interpreter, with ``main``'s exit code (``sys.exit``'s, or 0).

    A collective's worker thread (seen with gloo's ``runLoop``) releases a finished collective's tensors on its
    own time, after the caller's wait has returned; releasing a tensor Python has seen takes the GIL.
    If that comes after the main thread began finalizing the interpreter, Python ends the thread with
    ``pthread_exit``, whose unwinding through the worker's C++ frames calls ``std::terminate``: a finished run
    aborts with "terminate called without an active exception" (exit code -6: 20 of 40 two-rank gloo runs that
    exit right after an all-reduce; now and then a test's two-rank training). Destroying the process group does
    not join those threads: DeepSpeed's engine and module globals keep the groups alive until finalization. So
    the process ends as interpreter shutdown would, atexit handlers and flushed output included, but with
    ``os._exit``, which finalizes nothing (0 of 40 such runs abort).
    """
    try:
        main()
        code = 0
    except SystemExit as stop:  # as Python reads it: None is 0, an int itself, anything else printed and 1
        code = 0 if stop.code is None else stop.code
        if not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    atexit._run_exitfuncs()  # what interpreter shutdown runs first (logging, multiprocessing, compile workers)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def config_hash(resolved_config: str) -> str:
    return hashlib.sha256(resolved_config.encode()).hexdigest()[:16]


def data_fingerprint(paths: list[str]) -> str:
    """Content hash of the data files, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """All-reduce over the world (sum by default) on the backend's device; the result on the CPU."""
    import deepspeed.comm as dist

    reduced = tensor.to("cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(reduced, op=op or dist.ReduceOp.SUM)
    return reduced.cpu()


def verify_same_run(config_digest: str, data_key: str) -> None:
    """All ranks: raise ``PipellmError`` (on every rank) if any rank differs from rank 0."""
    import deepspeed.comm as dist

    mine = {"version": pipellm.__version__, "config hash": config_digest, "data key": data_key}
    identity = {"rank": dist.get_rank(), "host": socket.gethostname()}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (identity, mine))
    reference_identity, reference = everyone[0]
    for identity, theirs in everyone[1:]:
        for key, value in theirs.items():
            if value != reference[key]:
                raise PipellmError(
                    f"rank {identity['rank']} (host {identity['host']}) has pipellm {key} {value} but rank 0 (host "
                    f"{reference_identity['host']}) has {reference[key]}; every node needs the same pipellm code, "
                    f"config file and data files")


class RankFailure(Exception):
    """A failure this rank met on its own (a peer that went away, a checkpoint write that failed for want of disk):
    the other ranks may be blocked in a collective, so each rank that raises it prints its one line and exits
    with code 2 without destroying the process group (``pipellm.training.trainer.main``)."""


# What gloo and NCCL say when the rank at the other end of a connection is gone.
PEER_LOST_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
                   "ncclRemoteError")


def peer_lost(err: BaseException, what: str, peer: str = "a peer rank") -> RankFailure | None:
    """The one-line failure for ``err`` when it says a peer went away (None otherwise); ``what``: this rank and
    what it was doing, ``peer``: who it was talking to, as far as is known."""
    if not isinstance(err, RuntimeError) or not any(sign in str(err) for sign in PEER_LOST_SIGNS):
        return None
    address = re.search(r"\[([^\]\s/]+)\]:\d+", str(err))  # gloo names the peer's address: [10.0.0.2]:34567
    at = f" at {address.group(1)}" if address else ""
    return RankFailure(f"{what}: {peer}{at} went away (killed, out of memory or crashed: see its log)")


class StepWatch:
    """What the current step is doing (``watch_step`` around each step, ``enter`` at each operation), so that a
    peer that goes away mid-step ends the run with one line naming this rank, the operation and the step."""

    def __init__(self, stage: int | None = None):
        self.stage, self.rank = stage, int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.step, self.operation, self.since = 0, "", None

    @property
    def who(self) -> str:
        host = socket.gethostname()
        return (f"rank {self.rank} (host {host})" if self.stage is None
                else f"pipeline stage {self.stage} (rank {self.rank}, host {host})")

    def enter(self, operation: str) -> None:
        """From now on the step is in ``operation`` (named in a stall or peer-loss report)."""
        self.operation, self.since = operation, time.monotonic()

    @contextlib.contextmanager
    def watch_step(self, step: int):
        self.step = step
        self.enter("the start of the step")
        try:
            yield
        except RuntimeError as err:
            lost = peer_lost(err, f"{self.who} lost its connection in {self.operation} of step {step}",
                             self.peer_in(self.operation))
            if lost is None:
                raise
            raise lost from None
        finally:
            self.since = None

    def peer_in(self, operation: str) -> str:
        """The rank ``operation`` talks to, as far as is known."""
        return f"rank {1 - self.rank}" if self.world_size == 2 else "a peer rank"


# Pipeline instructions that talk to one neighbouring stage: the previous (-1) or the next (+1).
NEIGHBOUR_OF_INSTRUCTION = {"RecvActivation": -1, "SendGrad": -1, "SendActivation": 1, "RecvGrad": 1}


class StallWatchdog(StepWatch):
    """Ends the process with a one-line error when a pipeline operation stalls for ``timeout_s``.

    A rank that died or hung leaves the others blocked in a transfer forever: gloo's point-to-point receive has
    no timeout, and NCCL's watchdog aborts with a message that names neither the stage nor the step. So every
    instruction of DeepSpeed's pipeline schedule (``RecvActivation``, ``ForwardPass``, ``ReduceGrads``, ...) is
    timed from a side thread; the time between instructions counts as well. A stall prints which stage, rank,
    host, step and operation, and exits with code 2. Checkpoint saving is not watched (it may legitimately take
    long); the process group's own timeout covers it. A peer that died (its connections closed) is reported at
    once, with the neighbouring stage an instruction talks to.
    """

    def __init__(self, engine, stage: int, timeout_s: float, before_exit: Callable[[], None] | None = None):
        """``before_exit`` runs after a stall is reported, before the exit (which skips ``atexit``): work that
        must not be left half-written, such as the GPU profile's CSV."""
        super().__init__(stage)
        self.timeout_s, self.before_exit, self.grid = timeout_s, before_exit, getattr(engine, "grid", None)
        from pipellm.pipeline.deepspeed_compat import wrap_pipeline_instructions

        # Wrap each instruction to record what runs when.
        wrap_pipeline_instructions(engine, self._watched)
        threading.Thread(target=self._watch, name="pipellm-stall-watchdog", daemon=True).start()

    def _watched(self, name, method):
        def run(engine, **kwargs):
            self.enter(name)
            method(engine, **kwargs)
            self.enter(f"the step's bookkeeping after {name}")
        return run

    def peer_in(self, operation: str) -> str:
        offset = NEIGHBOUR_OF_INSTRUCTION.get(operation)
        if self.grid is not None and offset is not None:
            stage = self.stage + offset
            rank = self.grid.stage_to_global(stage)
        elif self.grid is not None and self.world_size == 2:  # a collective: the one other rank
            rank = 1 - self.rank
            stage = self.grid.topology().get_coord(rank).pipe
        else:
            return super().peer_in(operation)
        return f"stage {stage} (rank {rank})"

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 10))
            since = self.since
            if since is not None and time.monotonic() - since > self.timeout_s:
                print(f"error: {self.who} stalled for more than collective_timeout_s={self.timeout_s:g}s in "
                      f"{self.operation} of step {self.step}; another rank probably died or hung: check the other "
                      f"ranks' logs, the network (NCCL_SOCKET_IFNAME) and that every node runs the same config",
                      file=sys.stderr, flush=True)
                if self.before_exit is not None:
                    with contextlib.suppress(Exception):  # the stall report and the exit code come first
                        self.before_exit()
                os._exit(2)
