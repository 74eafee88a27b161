"""The result of a CCA run as a small, verifiable, revertible sparse delta (a peft-like adapter).

A :class:`SparseDelta` holds, per changed parameter, the row indices along one dimension, the
new rows and (optionally) the base rows, plus SHA-256 hashes of both, so that applying it can
check it was made for this model and reverting restores the base bit for bit.

Rows are stored in the parameter's own layout: ``param.index_select(dim, index)``, i.e. ``[R, in]``
for the output rows of an ``nn.Linear`` weight (``dim = 0``), ``[in, R]`` for output columns of a
GPT-2 ``Conv1D`` weight (``dim = 1``), ``[R]`` for bias entries.

On disk (a directory, written file by file atomically):

* ``delta.safetensors``: tensors ``"<param>::index"`` (int64 ``[R]``), ``"<param>::new"`` and, when
  base rows are stored, ``"<param>::base"``;
* ``delta_config.json``: ``format``, ``format_version``, ``base_model`` (name or path, revision,
  source and file hash when known), ``model_type``, ``dtype``, per parameter ``{dim, shape, dtype,
  rows, base_sha256, new_sha256}``, ``components``, ``hyperparameters``, ``metrics``, the
  SHA-256 of ``delta.safetensors`` (a config never pairs with the wrong tensors file) and
  ``content_sha256``: the SHA-256 of the canonical JSON (sorted keys, no spaces) of the config's
  meaningful entries (``format``, ``format_version``, ``model_type``, ``dtype``, ``params``,
  ``weights_sha256``; listed in ``content_sha256_covers``), so an edited or deleted parameter
  entry is refused. Descriptive entries (``metrics``, ``components``, ``base_model``...) are not
  covered: editing them changes nothing that is applied.

Loading verifies a delta as a whole before anything is applied: the content hash, every parameter
entry's fields and types, tensors of no entry, row indices (integer, in range, strictly
increasing: no duplicates), the rows' shapes, dtypes, hashes and finiteness (NaN / Inf rows are
refused). Deltas of format version 1 (cca_fast before the content hash) still load, with every
structural check but without the content hash; re-save them (``SparseDelta.load(d).save(d)``) to
add it. A version-2 config without ``content_sha256`` is refused.

An empty delta (no parameter: the run kept the base weights) is valid; applying it is a no-op.

Functions: :func:`apply_delta` -> :class:`DeltaHandle`, :func:`revert_delta`, :func:`merge_delta`
(apply + ``save_pretrained``). A delta refuses, with a :class:`~cca_fast.errors.CCAError` saying
why, to apply to a model missing one of its parameters, with another shape or dtype, or whose
current rows do not hash to the recorded base rows.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from cca_fast.errors import CCAError
from cca_fast.models import runtime
from cca_fast.io import atomic_write_bytes, atomic_write_json, refuse_special_file

FORMAT = "cca_fast.sparse_delta"
FORMAT_VERSION = 2
#: config entries covered by ``content_sha256`` (the rest is descriptive)
CONTENT_KEYS = ("format", "format_version", "model_type", "dtype", "params", "weights_sha256")
CONFIG_NAME = "delta_config.json"
WEIGHTS_NAME = "delta.safetensors"
_SEP = "::"

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: Any) -> torch.dtype:
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise CCAError(f"unknown dtype {name!r} in delta config")
    return dt


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and raw bytes (bit-exact identity)."""
    c = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{dtype_name(c.dtype)}{tuple(c.shape)}".encode())
    h.update(c.view(torch.uint8).numpy().tobytes() if c.numel() else b"")
    return h.hexdigest()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor reinterpreted as integers of the same width (bitwise comparison, NaN-safe)."""
    return t.view(_INT_VIEW[t.element_size()]) if t.is_floating_point() else t


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (``-0.0 != 0.0``, equal NaNs are equal)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a.detach()), _bits(b.detach()))


@dataclass
class ParamDelta:
    """Rows ``index`` along ``dim`` of one parameter: ``new`` (and ``base``) in parameter layout."""

    name: str
    dim: int
    index: torch.Tensor  # int64 [R], CPU, sorted unique
    new: torch.Tensor  # param.index_select(dim, index) after the update, CPU
    base: torch.Tensor | None  # the same before the update (None: not stored)
    shape: tuple[int, ...]  # the full parameter's shape
    dtype: torch.dtype
    base_sha256: str
    new_sha256: str

    @property
    def n_rows(self) -> int:
        return int(self.index.numel())

    def __repr__(self) -> str:
        return (f"ParamDelta({self.name!r}: {self.n_rows} rows along dim {self.dim} of {list(self.shape)} "
                f"{dtype_name(self.dtype)}{', base rows kept' if self.base is not None else ''})")

    def meta(self) -> dict[str, Any]:
        return {"dim": self.dim, "shape": list(self.shape), "dtype": dtype_name(self.dtype), "rows": self.n_rows,
                "base_sha256": self.base_sha256, "new_sha256": self.new_sha256, "has_base": self.base is not None}


@dataclass
class SparseDelta:
    """Changed rows of a model (see module docstring).

    Attributes:
        params: ``{parameter name: ParamDelta}``.
        meta: everything else written to ``delta_config.json`` (``base_model``, ``model_type``,
            ``components``, ``hyperparameters``, ``metrics``, ...).
        directory: the folder it was loaded from (:meth:`load`; ``None`` for one made in memory),
            which a merge must not replace.
    """

    params: dict[str, ParamDelta]
    meta: dict[str, Any] = field(default_factory=dict)
    directory: Path | None = field(default=None, compare=False, repr=False)

    def __repr__(self) -> str:
        rows = sum(pd.n_rows for pd in self.params.values())
        n_comp = len(self.meta.get("components") or [])
        comps = f", {n_comp} components" if n_comp else ""
        model = (self.meta.get("base_model") or {}).get("name_or_path") or self.meta.get("model_type") or "?"
        return f"SparseDelta({len(self.params)} parameters, {rows} rows{comps}, base model {model!r})"

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_rows(cls, model: nn.Module, selections: Mapping[str, Any], base_rows: Mapping[str, torch.Tensor],
                  new_rows: Mapping[str, torch.Tensor] | None = None, *, meta: Mapping[str, Any] | None = None,
                  store_base: bool = True) -> "SparseDelta":
        """A delta from known rows.

        Args:
            model: the model the rows belong to (for shapes, dtypes and identity).
            selections: ``{name: RowSelection}`` (anything with ``.dim`` and ``.index``).
            base_rows: ``{name: param.index_select(dim, index)}`` before the update.
            new_rows: the same after; default: read from ``model`` now.
            meta: extra config entries (``components``, ``hyperparameters``, ``metrics``...).
            store_base: keep the base rows in the delta (so it can be reverted without a handle);
                their hash is always kept.
        """
        params = runtime.base_parameters(model)
        out: dict[str, ParamDelta] = {}
        for name, sel in selections.items():
            if name not in params:
                raise CCAError(f"parameter {name!r} is not in the model")
            p = params[name]
            idx = sel.index.detach().to("cpu", torch.long)
            new = (new_rows[name] if new_rows is not None else p.detach().index_select(sel.dim, idx.to(p.device)))
            base = base_rows[name]
            new, base = new.detach().cpu().clone(), base.detach().cpu().clone()
            expect = list(p.shape)
            expect[sel.dim] = idx.numel()
            for what, t in (("base", base), ("new", new)):
                if list(t.shape) != expect or t.dtype != p.dtype:
                    raise ValueError(f"{name}: {what} rows have shape {tuple(t.shape)} {t.dtype}, expected {tuple(expect)} {p.dtype}")
            out[name] = ParamDelta(name, int(sel.dim), idx, new, base if store_base else None, tuple(p.shape), p.dtype,
                                   tensor_sha256(base), tensor_sha256(new))
        return cls(out, _default_meta(model, meta))

    @classmethod
    def from_models(cls, base_model: nn.Module, new_model: nn.Module, *, meta: Mapping[str, Any] | None = None,
                    store_base: bool = True, dims: Mapping[str, int] | None = None) -> "SparseDelta":
        """The delta between two models of identical structure: every parameter that differs
        (bitwise), with the rows (``dims[name]``, default: whichever of dim 0 / dim 1 needs fewer
        stored elements) that differ."""
        base_params = runtime.base_parameters(base_model)
        new_params = runtime.base_parameters(new_model)
        if base_params.keys() != new_params.keys():
            missing = sorted(base_params.keys() ^ new_params.keys())[:5]
            raise CCAError(f"the two models have different parameters (e.g. {missing}); a delta needs the same architecture")
        selections, base_rows, new_rows = {}, {}, {}
        for name, b in base_params.items():
            n = new_params[name]
            if b.shape != n.shape or b.dtype != n.dtype:
                raise CCAError(f"{name}: {tuple(b.shape)} {b.dtype} in the base model but {tuple(n.shape)} {n.dtype} in the new one")
            diff = _bits(b.detach().cpu()) != _bits(n.detach().cpu())
            if not bool(diff.any()):
                continue
            dim = dims.get(name) if dims else None
            if dim is None:
                dim = _compact_dim(diff)
            other = tuple(d for d in range(diff.dim()) if d != dim)
            rows = diff.any(dim=other).nonzero().flatten() if other else diff.nonzero().flatten()
            selections[name] = _Sel(dim, rows)
            base_rows[name] = b.detach().cpu().index_select(dim, rows)
            new_rows[name] = n.detach().cpu().index_select(dim, rows)
        return cls.from_rows(new_model, selections, base_rows, new_rows, meta=meta, store_base=store_base)

    # ---- summaries ---------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Counts for reports: parameters, rows, stored elements, largest absolute change."""
        max_change = 0.0
        non_finite = 0
        for pd in self.params.values():
            for t in (pd.new, pd.base):
                if t is not None and t.is_floating_point():
                    non_finite += int((~torch.isfinite(t)).sum())
            if pd.base is not None and pd.new.numel():
                change = float((pd.new.double() - pd.base.double()).abs().max())
                if change != change or max_change != max_change:  # NaN wins: max() would hide it
                    max_change = float("nan")
                else:
                    max_change = max(max_change, change)
        if non_finite:
            max_change = float("nan")
        return {
            "params": len(self.params),
            "rows": sum(pd.n_rows for pd in self.params.values()),
            "elements": sum(pd.new.numel() for pd in self.params.values()),
            "has_base_rows": all(pd.base is not None for pd in self.params.values()),
            "max_abs_change": max_change if all(pd.base is not None for pd in self.params.values()) else None,
            "non_finite_values": non_finite,
            "empty": not self.params,
        }

    def validate(self, where: str = "this delta") -> None:
        """Refuse (:class:`CCAError`) a delta that is not whole: an index that is not a strictly
        increasing 1-D integer tensor (duplicates), a ``dim`` outside the shape, rows whose shape
        or dtype do not match, NaN / Inf rows."""
        for name, pd in self.params.items():
            _check_param(name, pd, where)

    # ---- files -------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``delta.safetensors`` then ``delta_config.json`` into ``directory`` (each atomically).
        An existing delta there is refused unless ``overwrite`` (as :func:`merge_delta` refuses a
        non-empty target); temporary files of a save killed earlier are removed first."""
        from safetensors.torch import save as st_save

        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise CCAError(f"cannot save a delta to {d}: it exists and is not a directory")
        resave = self.directory is not None and d.resolve() == Path(self.directory).resolve()  # its own folder
        if not (overwrite or resave) and ((d / CONFIG_NAME).exists() or (d / WEIGHTS_NAME).exists()):
            raise CCAError(f"{d} already holds a delta; choose another directory, or pass overwrite=True to "
                           "replace it")
        for stale in d.glob(f".{WEIGHTS_NAME}.*") if d.is_dir() else ():  # left by a save killed mid-write
            stale.unlink(missing_ok=True)
        for stale in d.glob(f".{CONFIG_NAME}.*") if d.is_dir() else ():
            stale.unlink(missing_ok=True)
        self.validate(f"the delta to save in {d}")
        tensors: dict[str, torch.Tensor] = {}
        for name, pd in self.params.items():
            tensors[f"{name}{_SEP}index"] = pd.index.contiguous()
            tensors[f"{name}{_SEP}new"] = pd.new.contiguous()
            if pd.base is not None:
                tensors[f"{name}{_SEP}base"] = pd.base.contiguous()
        blob = st_save(tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        atomic_write_bytes(d / WEIGHTS_NAME, blob)
        config = dict(self.meta)
        config.update({"format": FORMAT, "format_version": FORMAT_VERSION,
                       "params": {n: pd.meta() for n, pd in self.params.items()},
                       "summary": self.summary(),
                       "weights_sha256": hashlib.sha256(blob).hexdigest()})
        config["content_sha256"] = content_sha256(config)
        config["content_sha256_covers"] = list(CONTENT_KEYS)
        atomic_write_json(d / CONFIG_NAME, config)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "SparseDelta":
        """Read a delta written by :meth:`save` (checks format, version and file pairing)."""
        from safetensors.torch import load as st_load

        d = Path(directory)
        cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
        for f in (cfg_path, w_path):
            refuse_special_file(f, "the delta file")
        if not cfg_path.is_file() or not w_path.is_file():
            raise CCAError(f"{d} is not a sparse delta directory: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
                           "(written by SparseDelta.save / `cca run`)")
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CCAError(f"{cfg_path} is not valid JSON ({e})") from None
        except RecursionError:
            raise CCAError(f"{cfg_path} nests too deeply to be a delta config; re-create the delta") from None
        fix = "re-create the delta (re-run `cca run`, or SparseDelta.save) instead of editing it"
        if not isinstance(config, dict):
            raise CCAError(f"{cfg_path} is not a delta config (a JSON object is expected); {fix}")
        if config.get("format") != FORMAT:
            raise CCAError(f"{cfg_path}: format {config.get('format')!r} is not {FORMAT!r}")
        version = config.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CCAError(f"{cfg_path}: format_version {version!r} is not a positive integer; {fix}")
        if version > FORMAT_VERSION:
            raise CCAError(f"{cfg_path}: format version {version} is newer than this "
                           f"cca_fast supports ({FORMAT_VERSION}); upgrade cca_fast")
        if version >= 2:
            recorded = config.get("content_sha256")
            if not isinstance(recorded, str):
                raise CCAError(f"{cfg_path} has no content_sha256 (format version {version} records one): the config "
                               f"was edited or truncated; {fix}")
            if content_sha256(config) != recorded:
                raise CCAError(f"{cfg_path} was modified after it was saved: its parameter entries (or format, dtype, "
                               f"model_type, weights_sha256) do not hash to the recorded content_sha256; {fix}")
        blob = w_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != config.get("weights_sha256"):
            raise CCAError(f"{w_path} does not match {cfg_path} (its SHA-256 differs): the files come from "
                           "different saves or one is corrupt")
        try:
            tensors = st_load(blob)
        except Exception as e:  # safetensors raises its own error types
            raise CCAError(f"{w_path} could not be read: {e}") from None
        entries = config.get("params")
        if not isinstance(entries, dict):
            raise CCAError(f"{cfg_path}: 'params' must be an object mapping parameter names to entries, "
                           f"got {type(entries).__name__}; {fix}")
        orphans = sorted({k.rsplit(_SEP, 1)[0] for k in tensors} - set(entries))
        if orphans:
            raise CCAError(f"{cfg_path} has no entry for parameter {orphans[0]!r}, whose rows are in {w_path}"
                           f"{f' (and {len(orphans) - 1} more)' if len(orphans) > 1 else ''}: an entry was deleted; "
                           f"applying the rest would apply the delta only in part; {fix}")
        params: dict[str, ParamDelta] = {}
        for name, m in entries.items():
            where = f"{cfg_path}, parameter {name!r}"
            if not isinstance(m, dict):
                raise CCAError(f"{where}: the entry must be an object, got {type(m).__name__}; {fix}")
            for key, kind in (("dim", int), ("shape", list), ("dtype", str), ("base_sha256", str), ("new_sha256", str)):
                if key not in m:
                    raise CCAError(f"{where}: the entry lacks {key!r}; {fix}")
                if not isinstance(m[key], kind) or isinstance(m[key], bool):
                    raise CCAError(f"{where}: {key!r} must be {kind.__name__}, got {type(m[key]).__name__}; {fix}")
            if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in m["shape"]):
                raise CCAError(f"{where}: 'shape' must be a list of non-negative integers, got {m['shape']!r}; {fix}")
            try:
                idx, new = tensors[f"{name}{_SEP}index"], tensors[f"{name}{_SEP}new"]
            except KeyError:
                raise CCAError(f"{w_path} lacks the rows of {name}") from None
            base = tensors.get(f"{name}{_SEP}base")
            if m.get("has_base") and base is None:
                raise CCAError(f"{where}: the entry records base rows but {w_path} has none; {fix}")
            if "rows" in m and m["rows"] != int(idx.numel()):
                raise CCAError(f"{where}: the entry records {m['rows']!r} rows but {w_path} holds {idx.numel()}; {fix}")
            pd = ParamDelta(name, m["dim"], idx, new, base, tuple(m["shape"]), _dtype_from_name(m["dtype"]),
                            m["base_sha256"], m["new_sha256"])
            _check_param(name, pd, str(d))
            pd.index = idx.long()
            if tensor_sha256(new) != pd.new_sha256 or (base is not None and tensor_sha256(base) != pd.base_sha256):
                raise CCAError(f"{w_path}: rows of {name} do not match their recorded hashes")
            params[name] = pd
        meta = {k: v for k, v in config.items()
                if k not in ("format", "format_version", "params", "summary", "weights_sha256", "content_sha256",
                             "content_sha256_covers")}
        return cls(params, meta, directory=d)


@dataclass
class _Sel:
    dim: int
    index: torch.Tensor


def content_sha256(config: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``config``'s :data:`CONTENT_KEYS` entries."""
    from cca_fast.io import _default

    # through JSON first: the hash of the config in memory (at save) equals that of the file read back
    covered = json.loads(json.dumps({k: config.get(k) for k in CONTENT_KEYS}, default=_default))
    text = json.dumps(covered, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_param(name: str, pd: ParamDelta, where: str) -> None:
    """One parameter's rows are whole (see :meth:`SparseDelta.validate`)."""
    fix = "re-create the delta"
    idx = pd.index
    if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.is_complex():
        raise CCAError(f"{where}: the row index of {name} must be a 1-D integer tensor, got "
                       f"{tuple(idx.shape)} {dtype_name(idx.dtype)}; {fix}")
    if not 0 <= pd.dim < max(len(pd.shape), 1):
        raise CCAError(f"{where}: 'dim' {pd.dim} of {name} is outside its shape {pd.shape}; {fix}")
    idx = idx.long()
    if idx.numel():
        if bool((idx[1:] <= idx[:-1]).any()):
            dup = idx[:-1][idx[1:] == idx[:-1]]
            what = (f"row {int(dup[0])} appears more than once" if dup.numel() else "its row indices are not sorted")
            raise CCAError(f"{where}: {name}: {what} (a delta lists each row once, in increasing order); {fix}")
        if int(idx[0]) < 0 or (pd.shape and int(idx[-1]) >= pd.shape[pd.dim]):
            raise CCAError(f"{where}: rows of {name} are out of range for its shape {pd.shape}; {fix}")
    expect = list(pd.shape)
    if expect:
        expect[pd.dim] = int(idx.numel())
    for what, t in (("new", pd.new), ("base", pd.base)):
        if t is None:
            continue
        if list(t.shape) != expect or t.dtype != pd.dtype:
            raise CCAError(f"{where}: the {what} rows of {name} are {tuple(t.shape)} {dtype_name(t.dtype)}, expected "
                           f"{tuple(expect)} {dtype_name(pd.dtype)}; {fix}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise CCAError(f"{where}: the {what} rows of {name} hold {n} NaN/Inf values; such a delta would break the "
                           "model (if it came from `cca run`, the update diverged: lower --lr)")


def _compact_dim(diff: torch.Tensor) -> int:
    """The dimension along which storing changed slices takes the fewest elements."""
    if diff.dim() < 2:
        return 0
    best, best_cost = 0, None
    for dim in range(2):
        other = tuple(d for d in range(diff.dim()) if d != dim)
        n = int(diff.any(dim=other).sum())
        cost = n * (diff.numel() // diff.shape[dim])
        if best_cost is None or cost < best_cost:
            best, best_cost = dim, cost
    return best


def model_identity(model: nn.Module) -> dict[str, Any]:
    """What is known about where ``model`` came from: name or path, revision, the loader's
    ``cca_source`` (with the GGUF file hash when there is one), ``model_type`` and dtype."""
    model = runtime.unwrap(model)  # a peft / compiled / wrapped model: the transformers model inside
    cfg = getattr(model, "config", None)
    src = getattr(model, "cca_source", None)
    source = src.to_dict() if hasattr(src, "to_dict") else None
    revision = (source or {}).get("revision") or getattr(cfg, "_commit_hash", None) or ""
    try:
        dtype = dtype_name(next(model.parameters()).dtype)
    except StopIteration:
        dtype = ""
    return {"name_or_path": (source or {}).get("name") or getattr(cfg, "_name_or_path", "") or "",
            "revision": revision, "file_sha256": (source or {}).get("sha256", ""), "source": source,
            "model_type": getattr(cfg, "model_type", ""), "dtype": dtype}


def _default_meta(model: nn.Module, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    ident = model_identity(model)
    out: dict[str, Any] = {"base_model": ident, "model_type": ident["model_type"], "dtype": ident["dtype"],
                           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        from cca_fast.version import __version__
        out["cca_fast_version"] = __version__
    except ImportError:  # pragma: no cover
        pass
    out.update(meta or {})
    return out


# ---------------------------------------------------------------------------------------------
# apply / revert / merge
# ---------------------------------------------------------------------------------------------
@dataclass
class DeltaHandle:
    """What :func:`apply_delta` changed: the rows it overwrote (to revert bit-exactly)."""

    delta: SparseDelta
    base_rows: dict[str, torch.Tensor]  # name -> rows before applying, on the parameter's device
    model_id: int
    active: bool = True

    def __repr__(self) -> str:
        return f"DeltaHandle({self.delta!r}, {'applied' if self.active else 'reverted'})"


def _check_rows(model: nn.Module, delta: SparseDelta) -> dict[str, torch.Tensor]:
    """Every parameter of ``delta`` exists with the right shape/dtype; returns current rows."""
    params = runtime.base_parameters(model)
    current: dict[str, torch.Tensor] = {}
    mt = getattr(getattr(runtime.unwrap(model), "config", None), "model_type", None)
    want = delta.meta.get("model_type")
    for name, pd in delta.params.items():
        if name not in params:
            raise CCAError(f"this delta does not fit the model: it changes parameter {name!r}, which the model lacks "
                           f"(delta made for a {want or 'different'} model, this is {mt}); load the base model "
                           f"{delta.meta.get('base_model', {}).get('name_or_path', '')!r}")
        p = params[name]
        if tuple(p.shape) != pd.shape:
            raise CCAError(f"this delta does not fit the model: {name} has shape {tuple(p.shape)} here but "
                           f"{pd.shape} in the delta's base model")
        if p.dtype != pd.dtype:
            raise CCAError(f"this delta was made for {dtype_name(pd.dtype)} weights but {name} is {dtype_name(p.dtype)}; "
                           f"load the model with dtype={dtype_name(pd.dtype)}")
        if pd.n_rows and (int(pd.index.min()) < 0 or int(pd.index.max()) >= p.shape[pd.dim]):
            raise CCAError(f"delta rows of {name} are out of range for shape {tuple(p.shape)}")
        current[name] = p.detach().index_select(pd.dim, pd.index.to(p.device))
    return current


@torch.no_grad()
def check_fits(model: nn.Module, delta: SparseDelta, *, verify: bool = True) -> None:
    """The checks :func:`apply_delta` makes before its first write (parameters present, shapes,
    dtypes, row ranges and, with ``verify``, the base rows' hashes), without writing: raises
    :class:`CCAError` when the delta does not fit ``model``. For commands that must know that a
    delta fits before spending time on the base model (``cca side-effects --delta``)."""
    _checked_current(model, delta, verify)


def _checked_current(model: nn.Module, delta: SparseDelta, verify: bool) -> dict[str, torch.Tensor]:
    """The model's current rows at the delta's indices, after every fit check (and, with
    ``verify``, the check that they are the delta's base rows)."""
    current = _check_rows(model, delta)
    if verify:
        for name, pd in delta.params.items():
            h = tensor_sha256(current[name])
            if h != pd.base_sha256:
                hint = (" (the delta is already applied to this model)" if h == pd.new_sha256 else
                        f" (it was made for {delta.meta.get('base_model', {}).get('name_or_path') or 'another model'})")
                raise CCAError(f"this delta was not made for this model: the current rows of {name} differ from "
                               f"the delta's base rows{hint}")
    return current


@torch.no_grad()
def apply_delta(model: nn.Module, delta: SparseDelta, *, verify: bool = True) -> DeltaHandle:
    """Write the delta's new rows into ``model`` (in place) and return a handle to revert it.

    Every check (parameters present, shapes, dtypes and, with ``verify``, the base rows' hashes)
    happens before the first write: a refused delta leaves the model untouched.
    """
    delta.validate()
    current = _checked_current(model, delta, verify)
    params = runtime.base_parameters(model)
    for name, pd in delta.params.items():
        p = params[name]
        p.index_copy_(pd.dim, pd.index.to(p.device), pd.new.to(p.device))
    return DeltaHandle(delta, current, id(runtime.unwrap(model)))


@torch.no_grad()
def revert_delta(model: nn.Module, handle_or_delta: DeltaHandle | SparseDelta, *, verify: bool = True) -> None:
    """Restore the rows a delta changed, bit-exactly.

    With a :class:`DeltaHandle` the rows saved at apply time are written back; with a
    :class:`SparseDelta` its stored base rows are (a delta saved without base rows cannot be
    reverted this way: keep the handle). With ``verify`` the model's rows must currently be the
    delta's new rows.
    """
    if isinstance(handle_or_delta, DeltaHandle):
        if not handle_or_delta.active:
            raise CCAError("this delta handle was already reverted")
        if handle_or_delta.model_id != id(runtime.unwrap(model)):
            raise CCAError("this handle belongs to another model object")
        delta, rows = handle_or_delta.delta, handle_or_delta.base_rows
    else:
        delta = handle_or_delta
        missing = [n for n, pd in delta.params.items() if pd.base is None]
        if missing:
            raise CCAError(f"this delta was saved without base rows (e.g. {missing[0]}), so it cannot restore the base "
                           "by itself: revert with the handle apply_delta returned, or reload the base model")
        rows = {n: pd.base for n, pd in delta.params.items()}
    current = _check_rows(model, delta)
    if verify:
        for name, pd in delta.params.items():
            if tensor_sha256(current[name]) != pd.new_sha256:
                raise CCAError(f"cannot revert: the rows of {name} are not the delta's new rows (was the delta "
                               "applied to this model, or were the weights changed since?)")
    params = runtime.base_parameters(model)
    for name, pd in delta.params.items():
        p = params[name]
        p.index_copy_(pd.dim, pd.index.to(p.device), rows[name].to(p.device))
    if isinstance(handle_or_delta, DeltaHandle):
        handle_or_delta.active = False


def merge_delta(model: nn.Module, delta: SparseDelta, out_dir: str | os.PathLike, *, tokenizer: Any = None,
                verify: bool = True, overwrite: bool = False) -> Path:
    """Apply ``delta`` to ``model`` and ``save_pretrained`` the merged model (and ``tokenizer``)
    to ``out_dir``. The directory appears complete or not at all (written to a temporary
    sibling ``.<name>.tmp-<pid>-*``, then renamed; removed on any failure, and left-overs of a
    killed process are removed by the next merge to the same place). The model keeps the delta
    applied.

    ``model`` may be wrapped (:func:`~cca_fast.models.runtime.unwrap`): the transformers model
    inside is saved. A peft model is saved as its *base* model with the delta merged (the plain
    model's names, loadable by ``AutoModelForCausalLM``); its adapters are not part of it (save
    them with peft's own ``save_pretrained`` and load them on top as before)."""
    source = getattr(getattr(model, "cca_source", None), "path", "") or ""
    out = check_merge_target(out_dir, overwrite=overwrite,
                             inputs=[x for x in (delta.directory, source) if x])
    apply_delta(model, delta, verify=verify)
    from cca_fast.tempdirs import sibling_tempdir

    tmp = sibling_tempdir(out)  # also removes the temporary folders of a killed earlier merge
    try:
        inner = runtime.unwrap(model, strict=True)
        if runtime.has_adapters(inner):
            inner.save_pretrained(tmp, state_dict=runtime.base_state_dict(inner))
        else:
            inner.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "cca_delta.json").write_text(json.dumps(
            {"merged_from": delta.meta.get("base_model"), "summary": delta.summary(),
             "components": delta.meta.get("components")}, indent=1, default=str), encoding="utf-8")
        if out.exists():  # overwrite: move the old one aside (a stale temp if killed now), then swap
            old = sibling_tempdir(out)
            os.replace(out, old / "old")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_merge_target(out_dir: str | os.PathLike, *, overwrite: bool = False,
                       inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Refuse, before any work, a merge target that exists and is not an empty directory (unless
    ``overwrite``) or whose parent is not a writable directory; an empty name; a target that is,
    contains or lies inside one of ``inputs`` (the delta's folder, the base model's folder: a
    merge replaces the whole target, so it would destroy them) or the current folder."""
    if not str(out_dir).strip():
        raise CCAError("the merge target is empty (--merge ''): name the new folder for the merged model, "
                       "e.g. --merge merged_model")
    out = Path(out_dir)
    target = out.expanduser().resolve()
    protected = [(Path(i).expanduser().resolve(), f"the input {i}") for i in inputs if i is not None and str(i)]
    protected.append((Path.cwd().resolve(), "the current folder"))
    for path, what in protected:
        if target == path or path.is_relative_to(target) or target.is_relative_to(path):
            how = ("is" if target == path else "contains" if path.is_relative_to(target) else "lies inside")
            raise CCAError(f"cannot merge into {out}: it {how} {what} ({path}), which the merge would replace or "
                           "write into; name a new folder outside the delta's and the model's folders, e.g. "
                           f"--merge {target.parent / (target.name + '_merged')}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not out.is_dir():
            raise CCAError(f"cannot merge into {out}: it exists and is not a directory; choose another path")
        if not overwrite:
            raise CCAError(f"{out} exists and is not empty; choose another directory or pass overwrite=True "
                           "(`cca apply --overwrite`)")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CCAError(f"cannot merge into {out}: {parent} is not a writable directory")
    return out
