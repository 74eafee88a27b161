"""One writer per output directory: a lock file holding the writer's pid and host.

:func:`dir_lock` holds an exclusive ``flock`` on ``run.lock`` (released by the kernel when the
process dies) and writes its pid there; it removes the file on exit, also when the body raises.
A lock file left by a process that no longer runs (same host, pid not alive: it was killed) is
taken over, with a message saying so; a live holder is a :class:`~cca_fast.errors.CCAError`
naming its pid and the fix.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from cca_fast.errors import CCAError
from cca_fast.io import open_for_write
from cca_fast.tempdirs import pid_alive

LOCK_NAME = "run.lock"


def warn(message: str) -> None:
    """Say ``message`` on stderr (also under ``--quiet``: it is a warning, not progress)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_lock(path: Path) -> dict:
    """The lock file's ``{"pid", "host", "started"}`` (an unreadable or torn one gives ``{}``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _held_by_other(info: dict) -> bool:
    """Whether the pid recorded in a lock file is another live process (or one on another host,
    which cannot be checked from here)."""
    pid = info.get("pid")
    if not isinstance(pid, int) or pid == os.getpid() and info.get("host") == socket.gethostname():
        return False
    return info.get("host") != socket.gethostname() or pid_alive(pid)


def _flock(fd: int) -> bool:
    """Take an exclusive ``flock`` on ``fd`` without waiting; ``False`` while another open file
    holds it. The kernel releases it when its holder dies, so a killed run never blocks. Where
    ``flock`` is unsupported (no ``fcntl``, some network file systems) the pid check alone decides."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # pragma: no cover - flock unsupported here
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (its holder may have removed it)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _refuse(directory: Path, path: Path, info: dict) -> CCAError:
    where = "" if info.get("host") in (None, socket.gethostname()) else f" on host {info.get('host')}"
    return CCAError(f"{directory} is in use by another cca process (pid {info.get('pid', '?')}{where}, started "
                    f"{info.get('started', '?')}): only one may write a run directory at a time. Wait for it to "
                    f"finish or use another --output directory; if that process is gone, delete {path}")


def acquire(directory: Path, say: Callable[[str], None] = warn) -> tuple[Path, int]:
    """Take the lock of ``directory`` (created if missing): an exclusive ``flock`` on
    ``run.lock``, which then holds this process's pid. Returns the path and the open descriptor
    (keep it open while writing). A lock file left by a process that is gone is taken over, with
    a message; a live holder is a :class:`CCAError` naming its pid and the fix."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    while True:
        fd = open_for_write(path, os.O_RDWR | os.O_CREAT)  # never through a link planted as run.lock
        if not _flock(fd):
            os.close(fd)
            raise _refuse(directory, path, read_lock(path))
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder removed it between our open and flock: open the new one
    info = read_lock(path)
    if _held_by_other(info):
        os.close(fd)
        raise _refuse(directory, path, info)
    if info.get("pid") is not None:
        say(f"{path}: taking over a stale lock of pid {info['pid']} (no longer running)")
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
    os.fsync(fd)
    return path, fd


def release(path: Path, fd: int) -> None:
    """Remove the lock file ``path`` (while still holding it) and let go of ``fd``."""
    try:
        if _same_file(fd, path):
            path.unlink()
    finally:
        os.close(fd)


@contextmanager
def dir_lock(directory: str | os.PathLike, say: Callable[[str], None] = warn) -> Iterator[Path]:
    """Hold the lock of ``directory`` for the body (released on exit and on exceptions)."""
    path, fd = acquire(Path(directory), say)
    try:
        yield path
    finally:
        release(path, fd)
