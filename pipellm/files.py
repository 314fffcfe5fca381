"""Files in and out, with one-line errors.

* Output appears whole or not at all: written under a temporary name next to the target, then renamed. A
  temporary name carries the host and the process id (``temporary_path``), so one left by a killed process can be
  recognised and removed (``remove_stale_temporaries``).
* ``write_failure`` says in words why a write failed for want of disk (full, read-only, no permission), including
  torch's opaque ``unexpected pos`` / ``basic_ios::clear`` when the disk fills during ``torch.save``;
  ``disk_error`` makes it the one line naming the file, how much to free and where else to write.
* ``load_torch_file`` reads a ``torch.save`` file with ``weights_only=True``; a truncated file, or one whose pickle
  holds more than tensors and plain data, is a ``PipellmError`` naming the file.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import socket
from pathlib import Path

from pipellm.errors import PipellmError

HOST = socket.gethostname()
TEMPORARY_RE = re.compile(r"\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)$")


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path beside ``path``; on success it is renamed to ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_figure(figure, path: str | Path) -> None:
    """A matplotlib ``Figure`` as a PNG at ``path``."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)


def temporary_path(path: Path) -> Path:
    """``<path>.tmp-<host>-<pid>``: where this process writes what becomes ``path``."""
    return path.with_name(f"{path.name}.tmp-{HOST}-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries of ``path`` whose process is gone on this host (a killed conversion's); returns them.
    A temporary named without a host (older pipellm) counts as this host's."""
    removed = []
    for candidate in sorted(path.parent.glob(f"{glob.escape(path.name)}.tmp-*")):
        match = TEMPORARY_RE.search(candidate.name[len(path.name):])
        if match and match.group("host") in (None, HOST) and not pid_alive(int(match.group("pid"))):
            if candidate.is_dir():
                shutil.rmtree(candidate, ignore_errors=True)
            else:
                candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


# What torch's writer says when the disk fills while it writes (it does not pass the OSError on).
TORCH_FULL_DISK = ("unexpected pos", "basic_ios::clear", "file write failed")


def write_failure(err: BaseException) -> str | None:
    """Why a write failed, when the disk is the cause: ``no space left on device``, ``read-only file system``,
    ``no permission``; None for anything else (a bug to show as it is)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device" if err.errno == errno.ENOSPC else "disk quota exceeded"
    if isinstance(err, OSError) and err.errno == errno.EROFS:
        return "read-only file system"
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM):
        return "no permission to write"
    if isinstance(err, RuntimeError) and any(text in str(err) for text in TORCH_FULL_DISK):
        return "no space left on device"
    if "No space left on device" in str(err) or "os error 28" in str(err):  # safetensors' writer (Rust io error)
        return "no space left on device"
    return None


def disk_error(err: BaseException, tmp: Path, target: Path, needed_bytes: int, fix: str) -> BaseException:
    """The one-line ``PipellmError`` for a write into ``tmp`` (what becomes ``target``) that failed for want of
    disk, ending with ``fix`` (another save location); ``err`` itself otherwise. ``needed_bytes``: about what the
    output holds, for how much to free."""
    reason = write_failure(err)
    if reason is None:
        return err
    where = Path(getattr(err, "filename", None) or target)
    if where == tmp or tmp in where.parents:  # name the file as it was to be called
        where = target / where.relative_to(tmp)
    if reason in ("no space left on device", "disk quota exceeded"):
        existing = next((p for p in (tmp, target.parent, *target.parents) if p.exists()), Path("/"))
        usable = shutil.disk_usage(existing).free + directory_bytes(tmp)
        short = max(needed_bytes - usable, 0) / 1e9
        return PipellmError(f"{reason} writing {where}; free {max(short, 0.1):.1f} GB (the output needs about "
                            f"{needed_bytes / 1e9:.1f} GB) or {fix}")
    return PipellmError(f"{reason}: cannot write {where}; {fix}")


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def load_torch_file(path: Path, map_location="cpu", mmap: bool = False):
    """``torch.load(path, weights_only=True)``, its failures one line naming the file."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "nsupported" in line),
                     "objects that are not tensors")
        raise PipellmError(f"{path}: refused for safety: its pickle holds more than tensors and plain data "
                           f"({found}), and pipellm never runs a pickle's code. Where you trust the file, convert "
                           f"it to safetensors once (load it with torch.load, save the tensors with "
                           f"safetensors.torch.save_file) and use that") from None
    except FileNotFoundError:
        raise PipellmError(f"{path} does not exist; the checkpoint is incomplete: copy the missing file") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PipellmError(f"{path}: cannot read it, the file is truncated or corrupted ({reason}); copy it "
                           f"again from its source or convert the checkpoint again") from None
