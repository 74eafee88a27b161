"""Temporary sibling directories that are renamed into place, and cleaned up when a run dies.

``sibling_tempdir(target)`` makes ``.<target name>.tmp-<pid>-<random>`` beside ``target`` (same
file system, so the final ``os.replace`` is atomic). The caller removes it on failure
(``try/finally``); a process killed outright (SIGKILL, power loss) cannot, so every call first
removes the temporary siblings of ``target`` whose process is no longer alive
(:func:`remove_stale_tempdirs`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

_TAG = ".tmp-"


def _prefix(target: Path) -> str:
    return f".{target.name}{_TAG}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` may still run on this host (signal 0 probes without sending); an
    unknown answer counts as alive, so nothing of a live process is ever taken over or removed."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or unknown: keep it
    return True


def remove_stale_tempdirs(target: str | os.PathLike, *, any_name: bool = False) -> list[Path]:
    """Remove the temporary siblings of ``target`` left by dead processes; returns them. With
    ``any_name``, those of every target in the same folder (a cache of many entries)."""
    target = Path(target)
    removed: list[Path] = []
    try:
        entries = list(target.parent.iterdir()) if target.parent.is_dir() else []
    except OSError:
        return removed
    prefix = _prefix(target)
    for e in entries:
        if any_name:
            if not (e.name.startswith(".") and _TAG in e.name and e.is_dir()):
                continue
            pid_text = e.name.rsplit(_TAG, 1)[1].split("-", 1)[0]
        elif not e.name.startswith(prefix) or not e.is_dir():
            continue
        else:
            pid_text = e.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and not pid_alive(int(pid_text)):
            shutil.rmtree(e, ignore_errors=True)
            removed.append(e)
    return removed


def sibling_tempdir(target: str | os.PathLike, *, any_name: bool = False) -> Path:
    """A new empty directory beside ``target`` (after removing stale ones of dead processes; see
    :func:`remove_stale_tempdirs` for ``any_name``)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tempdirs(target, any_name=any_name)
    return Path(tempfile.mkdtemp(prefix=f"{_prefix(target)}{os.getpid()}-", dir=target.parent))
