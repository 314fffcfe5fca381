"""Run a function on N local processes with a real gloo process group, started and ended as training does."""
from __future__ import annotations

import multiprocessing
import os
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args, errors):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from pipellm.training.distributed import close_process_group, init_process_group, run_as_process

    def run():
        try:
            init_process_group(timeout_s=300)
            fn(rank, *args)
            close_process_group()
        except BaseException:
            errors.put(f"rank {rank}:\n{traceback.format_exc()}")
            raise

    run_as_process(run)  # as the training scripts end


def run_distributed(world_size: int, fn, *args, timeout: float = 300) -> None:
    """Call ``fn(rank, *args)`` on ``world_size`` spawned processes; raise if any of them fails."""
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, errors)) for rank in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    failures = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    if failures or alive or any(p.exitcode for p in procs):
        raise AssertionError("distributed run failed" + (" (timeout)" if alive else "") + ":\n" + "\n".join(failures))
