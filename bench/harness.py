"""The one benchmark harness of ``bench/``: timers, peak memory, environment, result schema.

Every benchmark in ``bench/`` measures through this module, so every result file has the same
shape and the same meaning:

* **speed** (:func:`measure`, :func:`measure_round_robin`): ``warmup`` untimed calls, then
  ``repeats`` timed calls; the result is a :class:`Timing`: the 20 / 50 / 80 % quantiles of the
  per-call times in milliseconds (the spread says how much to trust a ratio). On CUDA each call
  is timed with CUDA events around it (the device synchronised after it); elsewhere with
  ``time.perf_counter``. Round-robin timing interleaves several functions (one call of each per
  round) so that load from other processes on a shared machine hits all of them alike.
  :func:`timed` is the one-shot variant for calls too long to repeat (a whole stage, a run).
* **peak memory** (:func:`peak_memory_bytes`), measured in a separate call, never while timing:
  extra bytes above what was allocated before the call. CUDA: ``torch.cuda.max_memory_allocated``
  after ``reset_peak_memory_stats``; CPU: ``torch.profiler`` with ``profile_memory=True`` (the
  peak running sum of the ``[memory]`` allocation / free events of one call, read from the
  exported trace, which keeps every event).
* **environment** (:func:`environment`): device name, torch / triton / transformers / python
  versions, date (UTC), git commit, CPU threads, ``TRITON_INTERPRET``; and the attention backend
  of a model when one is given.
* **result schema** (:data:`SCHEMA`, :func:`report`, :func:`validate`): a JSON object
  ``{"schema", "benchmark", "env", "config", "results": [...], "targets", ...}``; every timing
  inside it is a :class:`Timing` dict (``p20_ms``, ``p50_ms``, ``p80_ms``, ``repeats``), every
  peak a number of bytes or MiB under a key naming the unit. :func:`markdown_table` renders rows.

The kernel micro-benchmarks (``bench/kernels/test_micro.py``) use ``pytest-benchmark`` for
timing instead (``pytest bench/kernels --benchmark-json out.json``), with their inputs from the
same shapes.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

#: version of the result layout written by :func:`report` (bump when it changes)
SCHEMA = "cca_fast.bench/1"
#: quantiles every timing reports
QUANTILES = (0.2, 0.5, 0.8)


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------
def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return str(getattr(mod, "__version__", "?"))


def git_commit(cwd: str | Path | None = None) -> str:
    """The checkout's ``HEAD`` commit (``""`` outside a git checkout), with ``+dirty`` when
    tracked files changed."""
    where = str(cwd or Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=where,
                              timeout=10).stdout.strip()
        if not head:
            return ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=where, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - no git, no checkout, timeout: the commit is unknown
        return ""


def device_name(device: torch.device | str) -> str:
    """``NVIDIA H200`` on CUDA; ``CPU (x86_64, 1 threads)`` elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device | str = "cpu", model: Any = None) -> dict[str, Any]:
    """Device, library versions, date, git commit (and ``model``'s attention backend), for every
    results JSON."""
    device = torch.device(device)
    env: dict[str, Any] = {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "triton": _version("triton"), "transformers": _version("transformers"), "python": platform.python_version(),
        "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
    }
    if model is not None:
        from cca_fast.models.runtime import attention_backend

        env["attn_implementation"] = attention_backend(model)
    return env


# ---------------------------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Per-call time quantiles in milliseconds over ``repeats`` timed calls."""

    p20_ms: float
    p50_ms: float
    p80_ms: float
    repeats: int

    @classmethod
    def of(cls, times_ms: Sequence[float]) -> "Timing":
        """Quantiles (linear interpolation) of ``times_ms`` (at least one time)."""
        if not times_ms:
            raise ValueError("Timing.of needs at least one time")
        xs = sorted(float(t) for t in times_ms)
        q = [_quantile(xs, p) for p in QUANTILES]
        return cls(round(q[0], 4), round(q[1], 4), round(q[2], 4), len(xs))

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.p50_ms:.3g} ms [{self.p20_ms:.3g}, {self.p80_ms:.3g}]"


def _quantile(sorted_xs: Sequence[float], p: float) -> float:
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = p * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call_ms(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """One call of ``fn``: (result, milliseconds); CUDA events on CUDA."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize(device)
        return out, float(start.elapsed_time(end))
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, float]:
    """Run ``fn`` once: ``(result, wall seconds)``, the device synchronised before and after
    (for calls too long to repeat; use :func:`measure` for anything that can be repeated)."""
    device = torch.device(device)
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def measure(fn: Callable[[], Any], device: torch.device | str = "cpu", *, warmup: int = 1,
            repeats: int = 5) -> Timing:
    """``warmup`` untimed calls, then the :class:`Timing` of ``repeats`` calls of ``fn``."""
    return measure_round_robin({"fn": fn}, device, warmup=warmup, repeats=repeats)["fn"]


def measure_round_robin(fns: Mapping[str, Callable[[], Any]], device: torch.device | str = "cpu", *,
                        warmup: int = 1, repeats: int = 5,
                        keep_last: dict[str, Any] | None = None) -> dict[str, Timing]:
    """:class:`Timing` of each function, timed round-robin (one call of each per round).

    Args:
        keep_last: if given, receives each function's last result (to check what was timed).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    device = torch.device(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for k, fn in fns.items():
            out, ms = _call_ms(fn, device)
            if r >= warmup:
                times[k].append(ms)
            if keep_last is not None:
                keep_last[k] = out
            del out
    return {k: Timing.of(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
def peak_memory_bytes(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Extra bytes allocated at peak during one call of ``fn`` (see the module docstring); the
    result of ``fn`` is dropped before returning."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    fd, trace = tempfile.mkstemp(suffix=".json")  # prof.events() keeps only some [memory] events
    os.close(fd)
    try:
        prof.export_chrome_trace(trace)
        with open(trace, encoding="utf-8") as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    finally:
        os.unlink(trace)
    running = peak = 0
    for e in sorted(events, key=lambda e: float(e.get("ts", 0))):
        running += int(e.get("args", {}).get("Bytes", 0))
        peak = max(peak, running)
    return int(peak)


def peak_memory_mib(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """:func:`peak_memory_bytes` in MiB (3 decimals)."""
    return round(peak_memory_bytes(fn, device) / 2**20, 3)


# ---------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------
def report(benchmark: str, device: torch.device | str, results: list[dict[str, Any]], *,
           config: dict[str, Any] | None = None, targets: dict[str, Any] | None = None,
           model: Any = None, **extra: Any) -> dict[str, Any]:
    """A result in the one schema: ``schema``, ``benchmark``, ``env``, ``config``, ``results``,
    ``targets``, then ``extra`` keys. Timings in ``results`` may be :class:`Timing` objects:
    they are converted to dicts."""
    return {"schema": SCHEMA, "benchmark": benchmark, "env": environment(device, model),
            "config": config or {}, "results": _plain(results), "targets": targets or {}, **_plain(extra)}


def _plain(x: Any) -> Any:
    if isinstance(x, Timing):
        return x.to_dict()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


_TIMING_KEYS = {"p20_ms", "p50_ms", "p80_ms", "repeats"}


def is_timing(x: Any) -> bool:
    """Whether ``x`` is a :class:`Timing` dict."""
    return isinstance(x, dict) and set(x) == _TIMING_KEYS


def validate(result: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming what is wrong if ``result`` does not follow the schema: the
    envelope keys, an environment with device / versions / date / commit, a list of result rows,
    and every timing dict with ordered quantiles."""
    missing = {"schema", "benchmark", "env", "config", "results", "targets"} - set(result)
    if missing:
        raise ValueError(f"result lacks {sorted(missing)}")
    if result["schema"] != SCHEMA:
        raise ValueError(f"schema {result['schema']!r}, expected {SCHEMA!r}")
    env_missing = {"device", "torch", "triton", "transformers", "date", "commit"} - set(result["env"])
    if env_missing:
        raise ValueError(f"env lacks {sorted(env_missing)}")
    if not isinstance(result["results"], list):
        raise ValueError("results must be a list of rows")

    def walk(x: Any, path: str) -> None:
        if isinstance(x, dict):
            if set(x) & {"p20_ms", "p50_ms", "p80_ms"}:
                if not is_timing(x):
                    raise ValueError(f"{path}: a timing needs exactly {sorted(_TIMING_KEYS)}, got {sorted(x)}")
                if not (0 <= x["p20_ms"] <= x["p50_ms"] <= x["p80_ms"]) or x["repeats"] < 1:
                    raise ValueError(f"{path}: quantiles out of order or no repeats: {x}")
                return
            for k, v in x.items():
                walk(v, f"{path}.{k}")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")

    walk(result["results"], "results")


def p50(x: Any) -> float:
    """The median of a :class:`Timing` (object or dict), or ``x`` itself when it is a number
    (result files written before the harness)."""
    if isinstance(x, Timing):
        return x.p50_ms
    if isinstance(x, dict):
        return float(x["p50_ms"])
    return float(x)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; :class:`Timing` cells show ``p50 [p20, p80]``, floats 3 significant digits."""
    def cell(v: Any) -> str:
        if isinstance(v, Timing) or is_timing(v):
            t = v if isinstance(v, Timing) else Timing(**v)
            return str(t)
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def environment_line(env: Mapping[str, Any]) -> str:
    """One markdown line describing ``env`` (what every results table starts with)."""
    attn = f", attention `{env['attn_implementation']}`" if env.get("attn_implementation") else ""
    return (f"{env.get('device')}, torch {env.get('torch')}, triton {env.get('triton')}, transformers "
            f"{env.get('transformers')}{attn}; {env.get('date')}, commit `{str(env.get('commit', ''))[:12]}`")
