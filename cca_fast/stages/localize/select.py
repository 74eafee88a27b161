"""Stage 2 output: which components stage 3 updates.

Methods (:func:`select`):

* ``dcm``: components whose DCM mask is ``>= threshold`` (0.5, paper default) after clamping;
* ``atp-topk``: the ``k`` components with the highest AtP score;
* ``atp-fraction``: the top ``round(fraction * total)`` components by AtP score;
* ``random``: the control, the same number of components as another selection drawn with a
  seed (by default with the same count of each kind, so heads stay heads and neurons neurons;
  ``match_layers`` also the same count of each kind in every layer);
* :func:`select_per_kind`: any score ranked *within each kind*, with a budget per kind (a
  fraction of that kind's components, :func:`kind_budget_counts`); ``anti=True`` takes the
  lowest-ranked components at the same counts (the anti-selection control). The objective
  scores (``fisher``, ``grad-weight``, ``movement``: :mod:`.objective_scores`) and AtP with a
  per-kind budget go through it.

AtP rankings use the *signed* score by default: a high positive score means scaling the
component up raises the logit difference, which is what DCM keeps (mask pushed towards 1).
``by="abs"`` ranks by magnitude instead.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from cca_fast.attribution import Attribution
from cca_fast.errors import CCAError
from cca_fast.models.adapters import KINDS
from cca_fast.models.components import Component, ComponentSpace

METHODS = ("dcm", "atp-topk", "atp-fraction", "random", "per-kind")


@dataclass
class Selection:
    """A set of components.

    Attributes:
        indices: flat component indices (sorted, unique) in the model's :class:`ComponentSpace`.
        method: one of :data:`METHODS` (or a free-form name for hand-made selections).
        params: the method's parameters (``k``, ``fraction``, ``threshold``, ``seed``, ...).
        counts: selected components per kind, ``{"q": .., "k": .., "v": .., "mlp": ..}``.
        total: number of components in the model (for the fraction).
        model_type: ``config.model_type`` of the model it was made for.
    """

    indices: list[int]
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    total: int = 0
    model_type: str | None = None

    @classmethod
    def build(cls, space: ComponentSpace, indices: Iterable[int] | torch.Tensor, method: str,
              params: dict[str, Any] | None = None) -> "Selection":
        """A selection of ``indices`` (deduplicated, sorted, range-checked) in ``space``."""
        if isinstance(indices, torch.Tensor):
            indices = indices.flatten().tolist()
        idx = sorted({int(i) for i in indices})
        if idx and (idx[0] < 0 or idx[-1] >= space.total):
            raise CCAError(f"component index out of range [0, {space.total}): {idx[0] if idx[0] < 0 else idx[-1]}")
        return cls(idx, method, dict(params or {}), space.kind_counts(idx), space.total,
                   space.adapter.config.model_type)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        """The flat indices (so ``list(selection)`` and ``torch.tensor(list(selection))`` work)."""
        return iter(self.indices)

    def __repr__(self) -> str:
        kinds = " ".join(f"{k} {v}" for k, v in self.counts.items())
        return (f"Selection({self.method!r}: {len(self.indices)} of {self.total} components "
                f"({100 * self.fraction:.3g}%): {kinds}; params={self.params})")

    def names(self, space: ComponentSpace) -> list[str]:
        """The components' names (``"L3.q4"``...), as deltas save them."""
        return [str(c) for c in self.components(space)]

    @classmethod
    def from_names(cls, space: ComponentSpace, names: Iterable[str], method: str = "names",
                   params: dict[str, Any] | None = None) -> "Selection":
        """A selection of the components named ``names`` (``"L3.q4"``, e.g. a delta's
        ``meta["components"]``) in ``space``."""
        return cls.build(space, [space.index(n) for n in names], method, params)

    @property
    def fraction(self) -> float:
        """Selected / total components (the paper's "% of components" / 100)."""
        return len(self.indices) / self.total if self.total else 0.0

    def tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``LongTensor [len]`` of the flat indices."""
        return torch.tensor(self.indices, dtype=torch.long, device=device)

    def mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``BoolTensor [total]``, True at selected components."""
        m = torch.zeros(self.total, dtype=torch.bool, device=device)
        m[self.tensor(device)] = True
        return m

    def components(self, space: ComponentSpace) -> list[Component]:
        self.check_space(space)
        return space.components(self.indices)

    def check_space(self, space: ComponentSpace) -> None:
        """:class:`CCAError` unless this selection was made for a model shaped like ``space``."""
        if space.total != self.total or (self.model_type and space.adapter.config.model_type != self.model_type):
            raise CCAError(f"selection was made for a {self.model_type} model with {self.total} components, "
                           f"but this model is {space.adapter.config.model_type} with {space.total}")

    # ---- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "params": self.params, "counts": dict(self.counts),
                "total": self.total, "model_type": self.model_type, "n_selected": len(self.indices),
                "fraction": self.fraction, "indices": list(self.indices)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Selection":
        try:
            idx = [int(i) for i in d["indices"]]
            sel = cls(sorted(set(idx)), str(d["method"]), dict(d.get("params", {})),
                      {k: int(v) for k, v in d.get("counts", {}).items()}, int(d["total"]), d.get("model_type"))
        except (KeyError, TypeError, ValueError) as e:
            raise CCAError(f"malformed selection: {e!r}; expected keys indices, method, total") from None
        if sel.indices and (sel.indices[0] < 0 or sel.indices[-1] >= sel.total):
            raise CCAError(f"selection has an index outside [0, {sel.total})")
        return sel

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (temporary file + ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Selection":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise CCAError(f"selection file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise CCAError(f"{path} is not valid JSON ({e})") from None
        return cls.from_dict(data)


# ---- methods ----------------------------------------------------------------------------------

def _scores_and_order(scores: Attribution | torch.Tensor, space: ComponentSpace, by: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(scores, (Attribution, torch.Tensor)) and callable(getattr(scores, "attribution", None)):
        scores = scores.attribution()  # a DatasetAttribution: its component scores, blocks left out
    if isinstance(scores, Attribution):
        return scores.scores, scores.order(by)
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (space.total,):
        raise CCAError(f"scores must be an Attribution, a DatasetAttribution or a tensor [{space.total}] (one score per "
                       f"component), got {getattr(scores, 'shape', type(scores).__name__)}"
                       + (f": a dataset attribution's scores hold {2 * space.n_layers} block scores after the components; "
                          "pass the DatasetAttribution itself or its component_scores()"
                          if getattr(scores, "shape", None) == (space.total + 2 * space.n_layers,) else ""))
    if by not in ("signed", "abs"):
        raise CCAError(f"by must be 'signed' or 'abs', got {by!r}")
    key = (scores.abs() if by == "abs" else scores).detach().to(torch.float64).cpu()
    return scores, torch.sort(key, descending=True, stable=True).indices


def select_dcm(mask: Any, space: ComponentSpace, threshold: float = 0.5) -> Selection:
    """Components with ``mask >= threshold``. ``mask``: a ``[total]`` tensor or a
    :class:`~cca_fast.stages.localize.dcm.DCMResult`."""
    m = getattr(mask, "mask", mask)
    if not isinstance(m, torch.Tensor) or tuple(m.shape) != (space.total,):
        raise CCAError(f"DCM mask must be a tensor [{space.total}], got {getattr(m, 'shape', type(m).__name__)}")
    idx = torch.nonzero(m.detach() >= threshold).flatten()
    return Selection.build(space, idx, "dcm", {"threshold": float(threshold)})


def select_atp_topk(scores: Attribution | torch.Tensor, space: ComponentSpace, k: int, by: str = "signed") -> Selection:
    """The ``k`` best components by AtP score (ties broken by lower flat index)."""
    _, order = _scores_and_order(scores, space, by)
    k = int(k)
    if not 0 <= k <= order.numel():
        raise CCAError(f"k must be in [0, {order.numel()}] (components that were scored), got {k}")
    return Selection.build(space, order[:k], "atp-topk", {"k": k, "by": by})


def select_atp_fraction(scores: Attribution | torch.Tensor, space: ComponentSpace, fraction: float,
                        by: str = "signed") -> Selection:
    """The top ``round(fraction * total)`` components by AtP score."""
    if not 0.0 <= float(fraction) <= 1.0:
        raise CCAError(f"fraction must be in [0, 1], got {fraction} (e.g. 0.0159 for 1.59%)")
    _, order = _scores_and_order(scores, space, by)
    k = min(order.numel(), int(round(float(fraction) * space.total)))
    return Selection.build(space, order[:k], "atp-fraction", {"fraction": float(fraction), "k": k, "by": by})


def kind_budget_counts(space: ComponentSpace, budget: Mapping[str, float]) -> dict[str, int]:
    """``{kind: count}`` of a per-kind budget ``{kind: fraction of that kind's components in the
    model}`` (``round(fraction * n_layers * counts[kind])``; a kind left out gets 0), e.g.
    ``{"q": 0.05, "k": 0.05, "v": 0.05, "mlp": 0.01}``. The same fraction for every kind is that
    fraction of every kind's parameters, hence of all component-owned parameters (up to rounding)."""
    from cca_fast import checks

    checks.kind_budget("budget", budget, KINDS)
    return {k: int(round(float(budget.get(k, 0.0)) * space.n_layers * space.counts[k])) for k in KINDS}


def select_per_kind(scores: Attribution | torch.Tensor, space: ComponentSpace, budget: Mapping[str, float], *,
                    anti: bool = False, method: str = "per-kind", by: str = "signed",
                    params: dict[str, Any] | None = None) -> Selection:
    """The top ``kind_budget_counts(space, budget)[kind]`` components of each kind by score
    (ties broken by lower flat index), or with ``anti`` the bottom ones of each kind (the same
    counts: the lowest-ranked, i.e. the tail of the same ranking).

    Args:
        scores: ``[space.total]`` (or an :class:`Attribution`), higher = more important.
        budget: fraction of each kind's components (see :func:`kind_budget_counts`).
        method: the name recorded in the selection (``"fisher"``, ``"atp"``...).
        by: ``"signed"`` or ``"abs"`` ranking of the score.
    """
    counts = kind_budget_counts(space, budget)
    _, order = _scores_and_order(scores, space, by)
    kind_of = torch.tensor([KINDS.index(c.kind) for c in space], dtype=torch.long)
    chosen: list[int] = []
    for ki, kind in enumerate(KINDS):
        ranked = order[kind_of[order] == ki]  # this kind's components, best first
        n = counts[kind]
        chosen += (ranked[ranked.numel() - n:] if anti else ranked[:n]).tolist() if n else []
    p = {"budget": {k: float(v) for k, v in budget.items()}, "anti": bool(anti), "by": by, **(params or {})}
    return Selection.build(space, chosen, method + ("-anti" if anti else ""), p)


def _layer_kind_counts(space: ComponentSpace, like: Any) -> dict[str, list[int]]:
    """``{kind: [count per layer]}`` of a :class:`Selection`, or such a dict checked."""
    if isinstance(like, Selection):
        like.check_space(space)
        return space.layer_kind_counts(like.indices)
    ok = isinstance(like, dict) and not set(like) - set(KINDS) and all(
        isinstance(v, (list, tuple)) and len(v) == space.n_layers
        and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= space.counts[k] for n in v)
        for k, v in like.items())
    if not ok:
        raise CCAError(f"match_layers needs the Selection whose per-(layer, kind) counts it copies, or "
                       f"{{kind: [count per layer]}} with {space.n_layers} counts per kind within each layer's "
                       f"{space.counts}, got {like!r}")
    return {k: [int(n) for n in like.get(k, [0] * space.n_layers)] for k in KINDS}


def select_random(space: ComponentSpace, like: Selection | int | dict[str, int] | dict[str, list[int]], seed: int = 0,
                  match_kinds: bool = True, match_layers: bool = False) -> Selection:
    """Random control: as many components as ``like`` (a :class:`Selection`, a count, or a count
    per kind ``{"q": 107, "k": 24, "v": 14, "mlp": 786}``).

    With ``match_kinds`` (and a :class:`Selection` or per-kind counts) the count of each kind is
    matched too, and so the number of parameters (every component of a kind owns as many);
    components are drawn uniformly over layers within a kind. With ``match_layers`` (and a
    :class:`Selection`) the count of each kind *in each layer* is matched as well: the draw is
    uniform within every ``(layer, kind)`` (``like`` may then be ``{kind: [count per layer]}``,
    :meth:`ComponentSpace.layer_kind_counts`). Deterministic in ``seed``.
    """
    if match_layers:
        per = _layer_kind_counts(space, like)
        g = torch.Generator().manual_seed(int(seed))
        drawn: list[int] = []
        for kind in KINDS:
            for layer, want in enumerate(per[kind]):
                if want:
                    pool = space.offset(layer, kind) + torch.randperm(space.counts[kind], generator=g)[:want]
                    drawn += pool.tolist()
        return Selection.build(space, drawn, "random", {"seed": int(seed), "count": len(drawn), "match_kinds": True,
                                                        "match_layers": True,
                                                        "like": like.method if isinstance(like, Selection) else per})
    g = torch.Generator().manual_seed(int(seed))
    if isinstance(like, dict):
        unknown = set(like) - set(KINDS)
        if unknown or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in like.values()):
            raise CCAError(f"per-kind counts must map {', '.join(KINDS)} to integers >= 0, got {like!r}")
        count, per_kind = sum(like.values()), dict(like)
    elif isinstance(like, Selection):
        like.check_space(space)
        count, per_kind = len(like), dict(like.counts)
    else:
        count, per_kind, match_kinds = int(like), None, False
    if not 0 <= count <= space.total:
        raise CCAError(f"random selection size must be in [0, {space.total}], got {count}")
    params: dict[str, Any] = {"seed": int(seed), "count": count, "match_kinds": bool(match_kinds)}
    if isinstance(like, Selection):
        params["like"] = like.method
    elif isinstance(like, dict):
        params["like_kinds"] = dict(per_kind)
    if not match_kinds:
        return Selection.build(space, torch.randperm(space.total, generator=g)[:count], "random", params)
    chosen: list[int] = []
    for kind in KINDS:
        want = int(per_kind.get(kind, 0))
        pool = torch.tensor([space.offset(layer, kind) + i for layer in range(space.n_layers)
                             for i in range(space.counts[kind])], dtype=torch.long)
        if want > pool.numel():
            raise CCAError(f"cannot draw {want} {kind} components from {pool.numel()}")
        chosen += pool[torch.randperm(pool.numel(), generator=g)[:want]].tolist()
    return Selection.build(space, chosen, "random", params)


def select(method: str, space: ComponentSpace, *, scores: Attribution | torch.Tensor | None = None,
           mask: Any = None, k: int | None = None, fraction: float | None = None, threshold: float = 0.5,
           like: Selection | int | dict[str, int] | None = None, seed: int = 0, by: str = "signed",
           match_kinds: bool = True) -> Selection:
    """Dispatch to the ``method`` (one of :data:`METHODS`) with the arguments it needs.

    ``scores`` (``atp-topk``, ``atp-fraction``): the :class:`~cca_fast.attribution.Attribution`
    of :func:`~cca_fast.attribution.attribute`, the
    :class:`~cca_fast.attribution_dataset.run.DatasetAttribution` of
    :func:`~cca_fast.attribution_dataset.attribute_dataset` (its component scores: the
    attention / MLP block scores are not components), or a tensor ``[space.total]``."""
    def need(name: str, value: Any) -> Any:
        if value is None:
            raise CCAError(f"selection method {method!r} needs {name}=...")
        return value

    if method == "dcm":
        return select_dcm(need("mask", mask), space, threshold)
    if method == "atp-topk":
        return select_atp_topk(need("scores", scores), space, need("k", k), by)
    if method == "atp-fraction":
        return select_atp_fraction(need("scores", scores), space, need("fraction", fraction), by)
    if method == "random":
        return select_random(space, need("like", like), seed, match_kinds)
    raise CCAError(f"unknown selection method {method!r}; choose one of {', '.join(METHODS)}")

