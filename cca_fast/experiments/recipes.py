"""Named recipes: bundles of :class:`~cca_fast.experiments.config.RunConfig` settings.

A recipe is a dict of ``RunConfig`` overrides (``RunConfig.from_dict`` merges it into the
defaults; nested dicts into the nested configurations). ``cca run --recipe NAME`` starts from it,
and every other flag still overrides it; ``cca study --variants NAME,...`` runs recipes side by
side on the same shared stages.

================  ===========================================================================
``paper``         the paper's procedure (docs/method.md), at the CPU sizes of ``RunConfig()``:
                  pivots from sampled flipped traces, DCM masks, plain SGD on the logit
                  difference of every pivot; exactly ``RunConfig()``
``circuit-sft``   the paper's pivots and AtP top-2% components, the rows trained on the
                  training problems' gold solutions (sparse SFT on the circuit), AdamW lr 1e-4,
                  10 steps, validation at steps 0 / 5 / 10
``fisher-sft``    **the default of** ``cca run``: the rows with the largest Fisher score of the
                  training problems' gold-solution loss, 3% of each kind's heads and neurons
                  (~1% of the parameters of the default model), trained on those gold
                  solutions, AdamW lr 1e-3, 10 steps, validation at steps 0 / 5 / 10
``fork-hinge``    paper + greedy-path forking pivots, only those whose desired token is not
                  already the argmax, a capped margin (hinge 3.0) and a retain term (KL to the
                  base on the other trace tokens), AtP top-2%
================  ===========================================================================

The study in ``results/`` says which of them improves the embedded default model, and by how much
(README, "Which recipe"). :data:`DEFAULT_RECIPE` is what ``cca run`` uses without ``--recipe``
(:func:`recipe_config` with no name); ``RunConfig()`` itself stays the paper's procedure.
"""
from __future__ import annotations

import copy
from typing import Any

from cca_fast.errors import CCAError

RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "circuit-sft": {
        "selector": "atp-fraction", "select_fraction": 0.02,
        "update": {"objective": "gold_nll", "optimizer": "adamw", "lr": 1e-4, "max_steps": 10,
                   "eval_every_early": 5},
    },
    "fisher-sft": {
        "selector": "fisher", "select_per_kind": {"q": 0.03, "k": 0.03, "v": 0.03, "mlp": 0.03},
        "update": {"objective": "gold_nll", "optimizer": "adamw", "lr": 1e-3, "max_steps": 10,
                   "eval_every_early": 5},
    },
    "fork-hinge": {
        "selector": "atp-fraction", "select_fraction": 0.02,
        "pivot_source": "both", "pivot_filter": "not_argmax",
        "update": {"objective": "hinge", "margin": 3.0, "retain_weight": 1.0},
    },
}
#: the recipe ``cca run`` uses without ``--recipe``: the budget curve's selector (results/budget_curve):
#: Fisher is the one selector whose held-out gold log-likelihood gain beats the distribution of random
#: draws of the same per-kind counts at small budgets (README, "Does the choice of components
#: matter?"); its budget is the one with the best validation log-likelihood on that curve (3% of each kind)
DEFAULT_RECIPE = "fisher-sft"


def recipe(name: str) -> dict[str, Any]:
    """A copy of recipe ``name``'s overrides. Raises :class:`CCAError` for an unknown name."""
    if name not in RECIPES:
        raise CCAError(f"unknown recipe {name!r} (--recipe); recipes: {', '.join(RECIPES)}")
    return copy.deepcopy(RECIPES[name])


#: the selection budget fields: a recipe's belong to its selector
BUDGET_FIELDS = ("select_k", "select_fraction", "select_count", "select_per_kind", "select_kinds",
                 "select_layer_kinds", "select_anti")


def recipe_config(name: str = DEFAULT_RECIPE, overrides: dict[str, Any] | None = None):
    """The :class:`RunConfig` of recipe ``name`` with ``overrides`` (a nested dict) on top.

    An override of ``selector`` to another selector than the recipe's drops the recipe's budget
    (:data:`BUDGET_FIELDS`) too, so that ``--selector random --select-count 7`` means 7 random
    components whatever the recipe's own selector took; budget fields in ``overrides`` stay."""
    from cca_fast.experiments.config import RunConfig

    settings = recipe(name)
    overrides = overrides or {}
    if "selector" in overrides and overrides["selector"] != settings.get("selector", RunConfig.selector):
        settings = {k: v for k, v in settings.items() if k not in BUDGET_FIELDS and k != "selector"}
    return RunConfig.from_dict(overrides, base=RunConfig.from_dict(settings))


#: ``NAME:KIND`` suffixes of :func:`study_variants`: a control of recipe ``NAME``'s settings
VARIANT_KINDS = ("random", "random-kinds", "random-layers", "none")


def study_variants(spec: list[str]) -> dict[str, dict[str, Any]]:
    """``cca study --variants`` entries -> :attr:`StudyConfig.variants`.

    ``NAME`` is recipe ``NAME``; ``NAME:random`` its random control (the same settings on as many
    random components as ``NAME`` selected; condition ``NAME-random``); ``NAME:random-kinds`` the
    same with as many components *of each kind* (q, k, v, MLP), hence as many parameters
    (condition ``NAME-random-kinds``); ``NAME:random-layers`` as many of each kind in every layer
    (condition ``NAME-random-layers``); each random control is ``StudyConfig.random_seeds`` draws
    (conditions ``NAME-random-kinds``, ``NAME-random-kinds-s1``, ...); ``NAME:none`` the same
    update on every weight (condition ``NAME-none``: with ``circuit-sft``, full fine-tuning on the
    gold solutions, the paper's third baseline).
    """
    out: dict[str, dict[str, Any]] = {}
    for entry in spec:
        name, _, kind = entry.partition(":")
        settings = recipe(name)
        if not kind:
            out[name] = settings
        elif kind == "random":
            out[f"{name}-random"] = {**settings, "random_like": name, "label": f"random control ({name})"}
        elif kind == "random-kinds":
            out[f"{name}-random-kinds"] = {**settings, "random_like": name, "match_kinds": True,
                                           "label": f"random control, kinds matched ({name})"}
        elif kind == "random-layers":
            out[f"{name}-random-layers"] = {**settings, "random_like": name, "match_layers": True,
                                            "label": f"random control, layers and kinds matched ({name})"}
        elif kind == "none":
            out[f"{name}-none"] = {**settings, "selector": "none", "label": f"every weight ({name})"}
        else:
            raise CCAError(f"--variants entry {entry!r}: the suffix must be one of "
                           f"{', '.join(':' + k for k in VARIANT_KINDS)}")
    return out
