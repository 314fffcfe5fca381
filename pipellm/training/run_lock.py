"""One run per save directory: ``save_path/run.lock``.

Two runs writing the same ``save_path`` would delete each other's checkpoints and interleave ``metrics.jsonl``.
So global rank 0 creates ``run.lock`` (host, pid, the pid's start time, start time, config hash, rendezvous)
before anything is written to ``save_path``, refreshes its modification time (the heartbeat) from a side thread
every tenth of ``lock_stale_after_s``, and removes it when the run ends (with an error too). Every rank reads the
lock at start, so all ranks of a second run stop at once with one line naming the holder.

A lock whose run is gone is stale and taken over with a note: on this host, its process is gone (or the pid now
belongs to a process started later); on another host, its heartbeat is older than ``lock_stale_after_s``. So
``resume: auto`` after a crash just works. The lock is created exclusively (``os.link`` of a complete file):
of two runs starting together, one gets it. Ranks tell their own run's lock from another's by the rendezvous
(``MASTER_ADDR:MASTER_PORT``), which no two live runs share.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path

from pipellm.config import TrainConfig
from pipellm.errors import PipellmError
from pipellm.files import HOST, temporary_path, write_failure

TAKEOVER_WAIT_S = 60.0
"""How long ranks but 0 give rank 0 to take a crashed run's lock over before they call it another run's."""

LOCK_FILE = "run.lock"


def process_started(pid: int) -> float | None:
    """When process ``pid`` of this host started (seconds since the epoch); None: there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None


def rendezvous() -> str:
    return f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"


@dataclasses.dataclass(frozen=True)
class LockHolder:
    """What ``run.lock`` says about the run that holds it."""

    host: str
    pid: int
    pid_started: float
    """The process's start time: a pid reused by a later process is not the holder."""
    started: str
    """When the run took the lock (local time, ISO 8601)."""
    config_hash: str
    rendezvous: str
    """``MASTER_ADDR:MASTER_PORT`` of the holder's run."""

    @classmethod
    def me(cls, config_hash: str) -> "LockHolder":
        return cls(HOST, os.getpid(), process_started(os.getpid()), time.strftime("%Y-%m-%dT%H:%M:%S"),
                   config_hash, rendezvous())

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}, config {self.config_hash}"

    def gone_because(self, heartbeat_age_s: float, stale_after_s: float) -> str | None:
        """Why the holder's run is gone; None while it may still run."""
        if self.host == HOST:
            started = process_started(self.pid)
            return None if started is not None and abs(started - self.pid_started) < 1 else "its process is gone"
        if heartbeat_age_s > stale_after_s:
            return f"no heartbeat for {heartbeat_age_s:.0f}s > lock_stale_after_s={stale_after_s:g}"
        return None


class RunLock:
    """``save_path/run.lock`` for one run; ``hold`` takes it (rank 0) or checks it (other ranks)."""

    def __init__(self, cfg: TrainConfig):
        self.save_path = Path(cfg.save_path)
        self.path = self.save_path / LOCK_FILE
        self.stale_after_s = cfg.lock_stale_after_s
        self.stopped = threading.Event()

    @classmethod
    @contextlib.contextmanager
    def hold(cls, cfg: TrainConfig, config_hash: str):
        """Around a whole run, on every rank: stop with one line if another live run holds the lock; rank 0 takes
        it (a stale one over) and keeps its heartbeat until the run ends."""
        lock = cls(cfg)
        if int(os.environ.get("RANK", "0")) != 0:
            lock.wait_for_this_run(mine=rendezvous())
            yield
            return
        created_save_path = not lock.save_path.exists()
        me = lock.take(LockHolder.me(config_hash))
        heartbeat = threading.Thread(target=lock._beat, name="pipellm-run-lock-heartbeat", daemon=True)
        heartbeat.start()
        try:
            yield
        finally:
            lock.stopped.set()
            lock.release(me, remove_save_path=created_save_path)

    def read(self) -> tuple[LockHolder, float] | None:
        """The holder and the age of its heartbeat (seconds); None when there is no lock."""
        try:
            age = time.time() - self.path.stat().st_mtime
            return LockHolder(**json.loads(self.path.read_text())), age
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as err:
            raise PipellmError(f"{self.path} is not a pipellm run lock ({err}); if no run uses {self.save_path}, "
                               f"delete it") from None

    def wait_for_this_run(self, mine: str) -> None:
        """Ranks but 0: stop when the lock belongs to a live run other than the one at rendezvous ``mine``. A
        crashed run's lock on another host looks live until rank 0 (which can tell) has taken it over, so a lock
        of another run is read again for up to ``TAKEOVER_WAIT_S`` before this rank refuses, in a line of its
        own (rank 0's error is the only one printed otherwise)."""
        from pipellm.training.distributed import RankFailure

        deadline = time.monotonic() + min(TAKEOVER_WAIT_S, self.stale_after_s)
        while (found := self.read()) is not None:
            holder, age = found
            if holder.rendezvous == mine or holder.gone_because(age, self.stale_after_s) is not None:
                return
            if time.monotonic() > deadline:
                raise RankFailure(str(self.in_use(holder)))
            time.sleep(0.5)

    def in_use(self, holder: LockHolder) -> PipellmError:
        return PipellmError(f"`save_path` {self.save_path} is in use by another run ({holder.describe()}; "
                            f"{self.path}): wait for it to end or give this run another save_path; if that run "
                            f"is gone, delete {self.path}")

    def take(self, me: LockHolder) -> LockHolder:
        """Create the lock, taking a stale one over (with a note); raise if a live run holds it."""
        found = self.read()
        if found is not None:
            holder, age = found
            why = holder.gone_because(age, self.stale_after_s)
            if why is None:
                raise self.in_use(holder)
            self.set_aside(holder)
            print(f"pipellm: took over {self.path} from a run that is gone ({holder.describe()}: {why})",
                  file=sys.stderr)
        tmp = temporary_path(self.path)
        try:
            self.save_path.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(dataclasses.asdict(me)) + "\n")
            os.link(tmp, self.path)  # fails if another run created it meanwhile
        except FileExistsError:
            found = self.read()
            if found is None:  # taken and released again meanwhile
                raise PipellmError(f"{self.path}: another run took and released it while this one started; "
                                   f"start this one again") from None
            raise self.in_use(found[0]) from None
        except OSError as err:
            reason = write_failure(err)
            if reason is None:
                raise
            raise PipellmError(f"{reason}: cannot write {self.path}; change save_path") from None
        finally:
            tmp.unlink(missing_ok=True)
        return me

    def set_aside(self, stale: LockHolder) -> None:
        """Remove the stale lock ``stale`` unless another run took it over first (two runs may judge the same lock
        stale at once): the lock is moved aside, and put back when it turns out to be someone else's new one."""
        aside = temporary_path(self.path.with_name(self.path.name + ".stale"))
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # set aside by another run already: linking ours below tells who won
        try:
            moved = LockHolder(**json.loads(aside.read_text()))
            if moved != stale:
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
                raise self.in_use(moved)
        finally:
            aside.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self.stopped.wait(self.stale_after_s / 10):
            with contextlib.suppress(OSError):  # a file system hiccup; the next beat may get through
                os.utime(self.path)

    def release(self, me: LockHolder, remove_save_path: bool) -> None:
        """Remove the lock if it is still this run's; a ``save_path`` the run created and left empty too."""
        found = self.read()
        if found is not None and found[0] == me:
            self.path.unlink(missing_ok=True)
        if remove_save_path:
            with contextlib.suppress(OSError):  # not empty: the run wrote something
                self.save_path.rmdir()
