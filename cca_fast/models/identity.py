"""A cheap, deterministic identity of the weights behind ``--model``, without loading them.

The digest covers every file's name and size, small files (``config.json``, tokenizer files)
whole, a safetensors file's header (names, shapes, dtypes and offsets of every tensor) and, of
every large file, three 64 KiB samples (start, middle, end). It reads a few hundred KiB per file
whatever the model's size, so that changed weights are noticed on resume without hashing
gigabytes. ``None`` when the weights cannot be found locally (a hub id not in the cache).
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any

SMALL = 1 << 20  # files up to this size are hashed whole
SAMPLE = 1 << 16  # bytes per sample of a large file


def file_digest(path: Path, h: "hashlib._Hash") -> None:
    """Feed ``path``'s name, size and content (whole, or header + samples) into ``h``."""
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        if size <= SMALL:
            h.update(f.read())
            return
        if path.suffix == ".safetensors":
            (n,) = struct.unpack("<Q", f.read(8))
            h.update(f.read(min(n, 64 * SMALL)))
        for at in (0, size // 2, max(0, size - SAMPLE)):
            f.seek(at)
            h.update(f.read(SAMPLE))


def _files(root: Path) -> list[Path]:
    """The files of a model directory (recursively; hidden ones skipped), sorted by relative name."""
    return sorted((p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                  key=lambda p: p.relative_to(root).as_posix())


def weights_location(name_or_path: str | os.PathLike | None, revision: str | None = None) -> Path | None:
    """The local file or directory behind ``--model`` (the GGUF file for the default), or
    ``None`` for a hub id that is not in the local cache."""
    from cca_fast.models.loading import default_gguf_path

    name = "default" if name_or_path in (None, "default") else str(name_or_path)
    if name == "default":
        return default_gguf_path()
    p = Path(name).expanduser()
    if p.exists():
        return p
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # not a valid repo id, no hub library: nothing to identify
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def model_identity(name_or_path: str | os.PathLike | None, revision: str | None = None) -> dict[str, Any]:
    """``{"model": the --model value, "location": the local path or None, "digest": hex or None}``."""
    loc = weights_location(name_or_path, revision)
    digest = None
    if loc is not None:
        h = hashlib.sha256()
        for f in ([loc] if loc.is_file() else _files(loc)):
            h.update((f.relative_to(loc).as_posix() if loc.is_dir() else "").encode() + b"\0")
            file_digest(f, h)
        digest = h.hexdigest()
    return {"model": "default" if name_or_path in (None, "default") else str(name_or_path),
            "location": str(loc) if loc is not None else None, "digest": digest}
