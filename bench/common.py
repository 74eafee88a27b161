"""Shared by the benchmarks: environment record (device, versions, date, commit) and timers."""
from __future__ import annotations

import datetime as _dt
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch


def environment(device: torch.device | str = "cpu") -> dict:
    """Device, library versions, date and git commit, for every results JSON."""
    device = torch.device(device)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except Exception:  # pragma: no cover
        commit = ""
    try:
        import transformers
        tf = transformers.__version__
    except ImportError:  # pragma: no cover
        tf = None
    try:
        import triton
        tr = triton.__version__
    except ImportError:
        tr = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": name, "torch": torch.__version__, "transformers": tf, "triton": tr,
            "python": platform.python_version(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit}


def timed(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[object, float]:
    """Run ``fn`` once; (result, wall seconds), synchronising CUDA around it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device: torch.device | str = "cpu") -> float:
    for _ in range(warmup):
        timed(fn, device)
    return statistics.median(timed(fn, device)[1] for _ in range(repeats))
