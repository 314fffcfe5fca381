"""The converters' output directory: written under ``<save>.tmp-<host>-<pid>`` and renamed into place at the end.

Nothing is left behind: an error, Ctrl-C or SIGTERM (``stopped_by_signal``) removes the temporary directory, and a
start removes those of killed conversions (their process gone on this host). A write that fails for want of disk
(full, read-only, no permission; torch's ``unexpected pos`` when the disk fills) is one line naming the file.
"""
from __future__ import annotations

import contextlib
import shutil
import signal
import sys
from pathlib import Path
from typing import Iterator

from pipellm.errors import PipellmError
from pipellm.files import disk_error, remove_stale_temporaries, temporary_path


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a conversion; the exit status is 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stopped_by_signal() -> Iterator[None]:
    """SIGTERM (and SIGINT) raise ``Interrupted`` in the main thread, so the ``finally`` blocks clean up as they do
    for Ctrl-C; the previous handlers come back afterwards."""
    def interrupt(signum, frame):
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def atomic_output_dir(save_path: Path, input_path: Path, overwrite: bool, needed_bytes: int) -> Iterator[Path]:
    """Yield a temporary directory beside ``save_path``; on success it replaces ``save_path``. ``needed_bytes``
    (about what the output holds) goes into the message when the disk fills."""
    save_path, input_path = save_path.absolute(), input_path.resolve()
    if save_path.resolve() == input_path or save_path.resolve() in input_path.parents:
        # With --overwrite this would delete the very checkpoint being read.
        raise PipellmError(f"save path {save_path} contains the input {input_path}; choose another save path")
    if save_path.exists() and not (save_path.is_dir() and not any(save_path.iterdir())) and not overwrite:
        raise PipellmError(f"save path {save_path} already exists and is not empty; remove it, choose "
                           f"another path or pass --overwrite")
    tmp = temporary_path(save_path)
    try:
        save_path.parent.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temporaries(save_path):
            print(f"pipellm: removed {stale}, left by an interrupted conversion (its process is gone)",
                  file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)  # a killed run of this host that had our pid (containers reuse pids)
        tmp.mkdir()
        yield tmp
        if save_path.is_dir():
            shutil.rmtree(save_path)
        elif save_path.exists():
            save_path.unlink()
        tmp.rename(save_path)
    except (OSError, RuntimeError) as err:
        raise disk_error(err, tmp, save_path, needed_bytes, "choose another --save-path") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
