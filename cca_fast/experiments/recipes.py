"""Named recipes: bundles of :class:`~cca_fast.experiments.config.RunConfig` settings.

A recipe is a dict of ``RunConfig`` overrides (``RunConfig.from_dict`` merges it into the
defaults; nested dicts into the nested configurations). ``cca run --recipe NAME`` starts from it,
and every other flag still overrides it; ``cca study --variants NAME,...`` runs recipes side by
side on the same shared stages.

================  ===========================================================================
``paper``         the paper's procedure (docs/method.md), at the CPU sizes of ``RunConfig()``:
                  pivots from sampled flipped traces, DCM masks, plain SGD on the logit
                  difference of every pivot; exactly ``RunConfig()``
``circuit-sft``   **the default of** ``cca run``: the paper's pivots and AtP top-2% components,
                  the rows trained on the training problems' gold solutions (sparse SFT on the
                  circuit), AdamW lr 1e-4, 10 steps, validation at steps 0 / 5 / 10
``fisher-sft``    the budget curve's selector: the rows with the largest Fisher score of the
                  training problems' gold-solution loss, 0.8% of each kind's heads and
                  neurons (0.27% of the parameters), trained on those gold solutions, AdamW
                  lr 1e-3 (results/budget_curve)
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
        "selector": "fisher", "select_per_kind": {"q": 0.008, "k": 0.008, "v": 0.008, "mlp": 0.008},
        "update": {"objective": "gold_nll", "optimizer": "adamw", "lr": 1e-3, "max_steps": 10,
                   "eval_every_early": 5},
    },
    "fork-hinge": {
        "selector": "atp-fraction", "select_fraction": 0.02,
        "pivot_source": "both", "pivot_filter": "not_argmax",
        "update": {"objective": "hinge", "margin": 3.0, "retain_weight": 1.0},
    },
}
#: the recipe ``cca run`` uses without ``--recipe``: the variants study's winner on validation, which
#: beat the base and the paper's random control on the test split (README, "Which recipe works?")
DEFAULT_RECIPE = "circuit-sft"


def recipe(name: str) -> dict[str, Any]:
    """A copy of recipe ``name``'s overrides. Raises :class:`CCAError` for an unknown name."""
    if name not in RECIPES:
        raise CCAError(f"unknown recipe {name!r} (--recipe); recipes: {', '.join(RECIPES)}")
    return copy.deepcopy(RECIPES[name])


def recipe_config(name: str = DEFAULT_RECIPE, overrides: dict[str, Any] | None = None):
    """The :class:`RunConfig` of recipe ``name`` with ``overrides`` (a nested dict) on top."""
    from cca_fast.experiments.config import RunConfig

    base = RunConfig.from_dict(recipe(name))
    return RunConfig.from_dict(overrides or {}, base=base)


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
