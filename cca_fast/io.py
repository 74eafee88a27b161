"""Atomic file writes and JSON Lines helpers.

Nothing already computed may be lost: whole files are written to a temporary sibling and renamed
into place (``os.replace`` is atomic on POSIX), and resumable stages append one JSON line per
finished item, flushed and fsynced, so an interrupted run keeps every finished item.
"""
from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from cca_fast.errors import CCAError, DataError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


#: the ``errno`` values of a full disk (or an exhausted quota)
DISK_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def disk_full_error(e: OSError, doing: str, rerun: str) -> CCAError:
    """The one-line :class:`~cca_fast.errors.CCAError` of a full disk (``e.errno`` in
    :data:`DISK_FULL`) met while ``doing`` (``"step update of runs/x"``): what was being written,
    that finished files are kept (every write is atomic or a whole appended record), and
    ``rerun``: what to run once space is freed."""
    where = f" writing {e.filename}" if e.filename else ""
    return CCAError(f"no space left on the device ({errno.errorcode.get(e.errno, e.errno)}){where} during {doing}: "
                    f"the files already finished are kept (writes are atomic, records whole); free some space there, "
                    f"then {rerun}")


def _link_error(path: Path) -> CCAError:
    return CCAError(f"{path} is a symbolic link: cca_fast never writes or appends through a link (it could point "
                    "outside the output folder, and its target would be overwritten); remove the link "
                    f"(rm '{path}') and run the command again")


def open_for_write(path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
    """``os.open(path, flags)`` for writing, never through a symbolic link (``O_NOFOLLOW``) and only
    onto a regular file (a FIFO, a device or a folder there is refused instead of blocking or
    writing into it). Returns the descriptor (blocking, close-on-exec). Raises
    :class:`~cca_fast.errors.CCAError` naming the path and the fix."""
    path = Path(path)
    try:
        fd = os.open(path, flags | _NOFOLLOW | _NONBLOCK | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK) and path.is_symlink():  # EMLINK: the BSDs
            raise _link_error(path) from None
        if e.errno == errno.EISDIR:
            raise CCAError(f"{path} is a folder, where cca_fast writes a file: move it away and run again") from None
        raise
    kind = os.fstat(fd).st_mode
    if not stat.S_ISREG(kind):
        os.close(fd)
        raise CCAError(f"{path} is {describe_kind(kind)}, not a regular file: cca_fast writes only regular files; "
                       "remove it and run again")
    if _NONBLOCK:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_NONBLOCK)
    return fd


def describe_kind(mode: int) -> str:
    """``"a FIFO (named pipe)"``, ``"a folder"``, ``"a device"``... for a ``st_mode``."""
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def refuse_special_file(path: str | os.PathLike, what: str, *, folder_ok: bool = False,
                         error: type[Exception] = CCAError) -> None:
    """Refuse (``error``, naming ``what`` and the fix) a ``path`` that exists but is not a regular
    file (nor a folder, when ``folder_ok``): a FIFO would block the read forever, a device such as
    ``/dev/zero`` never ends, a socket cannot be read. Checked with ``os.stat`` (links followed),
    without opening anything; a missing path passes (its reader reports it)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror or e})") from None
    if stat.S_ISREG(mode) or (folder_ok and stat.S_ISDIR(mode)):
        return
    raise error(f"{what} {path} is {describe_kind(mode)}, not a regular file: cca_fast reads only regular files "
                "(a FIFO would block, a device never ends); pass the file itself (copy the data into a file)")


def refuse_links(directory: str | os.PathLike, names: Iterable[str] = ()) -> None:
    """Refuse (:class:`~cca_fast.errors.CCAError`) a symbolic link among the entries of
    ``directory`` (and of its sub-folders ``names``): an output folder cca_fast writes holds no
    link of its own, so a link there was planted and a write through it would land outside."""
    d = Path(directory)
    for folder in (d, *(d / n for n in names)):
        if folder != d and folder.is_symlink():
            raise _link_error(folder)
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.is_symlink():
                raise _link_error(entry)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Append one JSON line and make it durable before returning. A torn last line (left by a
    kill or a full disk) is repaired first (:func:`repair_torn_tail`), so that a record is never
    appended after a fragment."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, ensure_ascii=False, default=_default) + "\n").encode("utf-8")
    with os.fdopen(open_for_write(path, os.O_RDWR | os.O_CREAT | os.O_APPEND), "ab+") as f:
        _repair_tail(f)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def repair_torn_tail(path: str | os.PathLike) -> int:
    """Make the JSON Lines file ``path`` end at a whole line: a torn last line (no final newline)
    is cut off, or, when it is a whole JSON value that only lacks its newline, completed.
    Returns the number of bytes cut off (0 when the file was whole or is missing)."""
    path = Path(path)
    if not path.exists():
        return 0
    with os.fdopen(open_for_write(path, os.O_RDWR), "rb+") as f:
        return _repair_tail(f)


def _repair_tail(f: Any, block: int = 1 << 16) -> int:
    """:func:`repair_torn_tail` on an open binary file (read + write); reads only the tail."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return 0
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return 0
    start, tail = size, b""
    while start > 0 and b"\n" not in tail:
        step = min(block, start)
        start -= step
        f.seek(start)
        tail = f.read(step) + tail
    cut = start + tail.rfind(b"\n") + 1  # 0 when the file holds no newline at all
    fragment = tail[tail.rfind(b"\n") + 1:]
    if _is_json(fragment):
        f.seek(size)
        f.write(b"\n")
        return 0
    f.truncate(cut)
    f.flush()
    os.fsync(f.fileno())
    f.seek(cut)
    return size - cut


def _is_json(data: bytes) -> bool:
    """Whether ``data`` is one whole JSON value (a finished record that only lacks its newline)."""
    try:
        json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return bool(data.strip())


class MalformedLineError(DataError, ValueError):
    """A malformed line in the middle of a JSON Lines file (a ``ValueError`` too, as before)."""


def read_jsonl(path: str | os.PathLike, *, tolerate_torn_tail: bool = True) -> Iterator[Any]:
    """Records of a JSON Lines file. A torn last line (a write interrupted by a kill) is skipped
    when ``tolerate_torn_tail``; a malformed line elsewhere raises :class:`MalformedLineError`
    with its number and the fix."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            if tolerate_torn_tail and i == last:
                return
            raise MalformedLineError(
                f"{path}:{i + 1}: malformed JSON line ({e.msg}) in the middle of the file (a damaged "
                f"file, not a torn last line); the lines before it are intact: delete line {i + 1} and "
                "the lines after it (a resumed run recomputes them), or delete the file") from None



def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> None:
    """Write all ``records`` atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=_default) + "\n" for r in records))


def _default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def check_or_write_config(path: str | os.PathLike, new: dict[str, Any], defaults: dict[str, Any], what: str,
                          *, write: bool = True) -> None:
    """Write the configuration ``new`` to ``path``, or, when ``path`` exists (a resumed run), check
    that it holds the same one. Nested dicts (nested configurations) are compared key by key and
    differences named by their dotted path (``dcm.epochs``). A key the saved file lacks (a field
    added since) counts at its value in ``defaults``; the top-level ``output`` may differ. ``what``
    names the directory in the error. ``write=False``: only the check (nothing is written)."""
    if not Path(path).exists():
        if write:
            atomic_write_json(path, new)
        return
    diff = config_differences(read_json(path), new, defaults)
    if diff:
        raise CCAError(f"{what} holds a run with a different configuration (differs in: {', '.join(diff)}); "
                       "use another --output directory, or delete it to start over")


def config_differences(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` (keys like ``dcm.epochs``, sorted) where the nested
    configurations ``old`` (a saved one) and ``new`` differ; a key ``old`` lacks (a field added
    since) counts at its value in ``defaults``, and the top-level ``output`` is not compared."""
    old, new_flat, default_flat = _flatten(old), _flatten(new), _flatten(defaults)
    # a default fills a key the saved file lacks, unless the file has keys below it (a default
    # ``{}`` beside a saved ``variants.paper = {}``)
    below = {k.rsplit(".", i)[0] for k in old for i in range(1, k.count(".") + 1)}
    old = {**{k: default_flat[k] for k in set(default_flat) - set(old) - below}, **old}
    keys = sorted(k for k in set(old) | set(new_flat) if k != "output" and old.get(k) != new_flat.get(k))
    return {k: (old.get(k), new_flat.get(k)) for k in keys}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (an empty nested dict stays a leaf)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def add_seconds(path: str | os.PathLike, name: str, seconds: float) -> None:
    """Add ``seconds`` to entry ``name`` of the JSON timing file ``path`` (accumulates over resumptions)."""
    d = read_json(path) if Path(path).exists() else {}
    d[name] = round(d.get(name, 0.0) + seconds, 3)
    atomic_write_json(path, d)


def check_writable_dir(directory: str | os.PathLike, what: str) -> Path:
    """Create ``directory`` (with its parents) if needed and check that a file can be written in
    it (a probe file is written and deleted), before any work whose results go there. Raises
    :class:`~cca_fast.errors.CCAError` naming ``what`` (e.g. ``"--output"``) and the path when it
    cannot be: a parent is a file, the path is a file, or the folder is read-only."""
    if not str(directory).strip():  # Path("") is the current folder: never write there by accident
        raise CCAError(f"{what} is empty (''): name the folder to write, e.g. {what} runs/out")
    d = Path(directory).expanduser()
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".cca-write-probe-{os.getpid()}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600))
        probe.unlink()
    except OSError as e:
        why = e.strerror or str(e)
        if d.exists() and not d.is_dir():
            why = "it is a file, not a folder"
        else:
            for parent in d.parents:
                if parent.exists() and not parent.is_dir():
                    why = f"{parent} is a file, not a folder"
                    break
        raise CCAError(f"{what} {d} cannot be written ({why}); choose a writable folder, or fix its "
                       "permissions, before anything is computed") from None
    return d
