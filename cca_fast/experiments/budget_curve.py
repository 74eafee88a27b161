"""Does the choice of components matter? A budget curve of selectors against random draws.

For each budget (the same fraction of every kind's heads and neurons: that fraction of the
component-owned parameters) and each selector, sparse SFT on the training problems' gold
solutions (stage 3, objective ``gold_nll``) updates only the selected rows; the step (0 = the
base weights included) is chosen on the validation problems' gold log-likelihood; the metric is
the test problems' gold-solution log-likelihood (:mod:`cca_fast.evaluation.gold_loglik`),
paired per problem. Conditions per budget:

* each selector of ``selectors`` (``atp``: AtP on the pivots, ``fisher``, ``grad-weight``,
  ``movement``: :mod:`cca_fast.stages.localize.objective_scores`), ranked within each kind, and
  with ``anti`` its anti-selection (the lowest-ranked at the same counts);
* ``random_seeds`` kinds-matched random draws (every budget) and ``layer_seeds``
  layer-and-kind-matched draws of the first selector's selection (``layer_budgets``).

Every selector and draw at a budget has exactly the same counts of each kind, hence the same
number of trainable parameters. The selector's gain over the random *distribution* is
:meth:`~cca_fast.evaluation.stats.StratifiedBootstrap.pooled_difference` (problems and draws
resampled). One model load serves a call; every score and condition is a file in ``output``, so
an interrupted run resumes (``limit`` conditions per call: callers can take a lock per call).

Layout::

    OUTPUT/config.json           the BudgetCurveConfig (a resumed run must use the same)
    OUTPUT/scores/<name>.pt      component scores [total] (float64)
    OUTPUT/base.json             the base model's validation and test gold log-likelihoods
    OUTPUT/conditions/<c>.json   one condition: selection counts, parameters, step choice, test records
    OUTPUT/study.json, study.md, study.png   the comparison (:func:`write_report`)

Accuracy and side effects of chosen conditions: :mod:`cca_fast.experiments.budget_decoded`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cca_fast.errors import CCAError
from cca_fast.evaluation.prompting import PromptConfig
from cca_fast.experiments import config_io
from cca_fast.experiments.budget_report import accuracy_section, plot, render_markdown, side_effect_section
from cca_fast.io import atomic_write_json, atomic_write_text, check_or_write_config, read_json
from cca_fast.stages.update import UpdateConfig

SELECTOR_NAMES = ("atp", "fisher", "grad-weight", "movement")


def _default_update() -> UpdateConfig:
    return UpdateConfig(optimizer="adamw", lr=1e-3, max_steps=2, batch_size=16, objective="gold_nll",
                        eval_every=1, eval_every_early=1, early_steps=1)


@dataclass
class BudgetCurveConfig:
    """What the curve compares (written to ``config.json``).

    Attributes:
        output: the directory.
        model, data, n_per_template, seed: the model and the seeded splits (as ``cca run``).
        prompt: the evaluation / training prompt.
        pivots: a ``training_examples.json`` of a run (its pivot examples: AtP scores them, and
            their problems are the training problems when ``n_train`` allows).
        n_train: training problems (the pivots' problems first, then a seeded draw of the
            training split); ``n_val``, ``n_test``: validation / test problems (``None``: all).
        budgets: fractions of every kind's components.
        selectors: among :data:`SELECTOR_NAMES`, in run order; ``anti``: also each
            anti-selection.
        random_seeds: kinds-matched random draws per budget; ``layer_seeds``: layer-and-kind
            matched draws of the first selector at ``layer_budgets`` (``None``: the smallest).
        update: stage 3 (objective ``gold_nll``; validation at every step).
        lrs: learning rates tried for every condition (``None``: ``update.lr`` only); each
            condition keeps the learning rate, and within it the step, of the highest validation
            gold log-likelihood (the test split never chooses), and records every rate's history.
        movement: the dense fine-tune of the movement score.
        batch_size: test/validation scoring batch.
    """

    output: str = "runs/budget_curve"
    model: str | None = None
    data: str | None = None
    n_per_template: int = 15
    seed: int = 0
    prompt: PromptConfig = field(default_factory=PromptConfig)
    pivots: str | None = None
    n_train: int = 16
    n_val: int | None = None
    n_test: int | None = None
    budgets: list[float] = field(default_factory=lambda: [0.0025, 0.01, 0.04])
    selectors: list[str] = field(default_factory=lambda: ["fisher", "grad-weight", "movement"])
    anti: bool = True
    random_seeds: int = 5
    layer_seeds: int = 5
    layer_budgets: list[float] | None = None
    update: UpdateConfig = field(default_factory=_default_update)
    lrs: list[float] | None = None
    movement: UpdateConfig = field(default_factory=lambda: dataclasses.replace(_default_update(), lr=1e-4))
    batch_size: int = 16

    def __post_init__(self) -> None:
        from cca_fast import checks

        bad = [s for s in self.selectors if s not in SELECTOR_NAMES]
        if bad or not self.selectors:
            raise CCAError(f"unknown selectors {bad}; choose among {', '.join(SELECTOR_NAMES)}")
        if "atp" in self.selectors and not self.pivots:
            raise CCAError("selector atp scores pivot examples: set pivots to a run's training_examples.json")
        for b in [*self.budgets, *(self.layer_budgets or [])]:
            checks.number("BudgetCurveConfig.budgets", b, lo=0, hi=1, lo_open=True)
        for name in ("n_train", "batch_size", "n_per_template"):
            checks.positive(f"BudgetCurveConfig.{name}", getattr(self, name))
        for name in ("random_seeds", "layer_seeds"):
            checks.integer(f"BudgetCurveConfig.{name}", getattr(self, name), lo=0)
        if self.lrs is not None:
            if not self.lrs:
                raise CCAError("BudgetCurveConfig.lrs is empty: give learning rates to try, or None for update.lr")
            for lr in self.lrs:
                checks.number("BudgetCurveConfig.lrs", lr, lo=0, lo_open=True)
        self.update = dataclasses.replace(self.update, objective="gold_nll")

    def to_dict(self) -> dict[str, Any]:
        return config_io.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BudgetCurveConfig":
        return config_io.from_dict(cls, data)

    # ---- conditions ---------------------------------------------------------------------
    def conditions(self) -> list[dict[str, Any]]:
        """Every condition, in run order (so that a partial run is informative): at the first
        budget the selectors, their anti-selections and the random draws; at the other budgets
        (breadth first) the first selector, the random draws seed by seed, the other selectors;
        the layer-matched draws;
        ``movement`` (the costliest score) and its anti-selection at every budget; the other
        anti-selections."""
        late = [s for s in self.selectors if s == "movement" and len(self.selectors) > 1]  # the costliest score
        early = [s for s in self.selectors if s not in late]

        def one(s: str, b: float, anti: bool) -> dict[str, Any]:
            return {"name": f"{s}{'-anti' if anti else ''}@{b:g}", "selector": s, "budget": b, "anti": anti}

        def draws(b: float) -> list[dict[str, Any]]:
            return [{"name": f"random-s{seed}@{b:g}", "selector": "random", "budget": b, "seed": seed}
                    for seed in range(self.random_seeds)]

        first, rest = self.budgets[0], self.budgets[1:]
        out = [c for s in early for c in self._pair(s, first)] + draws(first)
        out += [one(early[0], b, False) for b in rest]  # breadth first: every budget gets its first points
        out += [d for ds in zip(*(draws(b) for b in rest)) for d in ds]
        out += [one(s, b, False) for s in early[1:] for b in rest]
        layer_budgets = self.layer_budgets if self.layer_budgets is not None else [first]
        out += [{"name": f"random-layers-s{seed}@{b:g}", "selector": "random-layers", "budget": b,
                 "seed": seed, "like": f"{self.selectors[0]}@{b:g}"} for b in layer_budgets
                for seed in range(self.layer_seeds)]
        out += [c for s in late for b in self.budgets for c in self._pair(s, b)]
        if self.anti:
            out += [one(s, b, True) for b in rest for s in early]
        return out

    def _pair(self, selector: str, b: float) -> list[dict[str, Any]]:
        out = [{"name": f"{selector}@{b:g}", "selector": selector, "budget": b, "anti": False}]
        if self.anti:
            out.append({"name": f"{selector}-anti@{b:g}", "selector": selector, "budget": b, "anti": True})
        return out


class _Session:
    """The loaded model, data and scorers of one call."""

    def __init__(self, config: BudgetCurveConfig):
        from cca_fast.experiments.config import RunConfig
        from cca_fast.experiments.steps.data import make_splits, subset
        from cca_fast.models.components import ComponentSpace
        from cca_fast.models.loading import load_model
        from cca_fast.stages.sft import build_sft_examples

        self.config = c = config
        self.out = Path(c.output)
        self.model, self.tokenizer = load_model(c.model)
        self.space = ComponentSpace(self.model)
        splits = make_splits(RunConfig(data=c.data, n_per_template=c.n_per_template, seed=c.seed))
        self.pivots = []
        if c.pivots:
            from cca_fast.stages.examples import PivotExample

            self.pivots = [PivotExample.from_dict(e) for e in read_json(c.pivots)["examples"]]
        by_id = {p.id: p for p in splits.train}
        first = [by_id[e.problem_id] for e in self.pivots if e.problem_id in by_id]
        first = list({p.id: p for p in first}.values())[: c.n_train]
        rest = [p for p in splits.train if p.id not in {q.id for q in first}]
        self.train = first + subset(rest, c.n_train - len(first), c.seed) if len(first) < c.n_train else first
        self.val = subset(splits.val, c.n_val, c.seed)
        self.test = subset(splits.test, c.n_test, c.seed)
        self.gold = build_sft_examples(self.train, self.tokenizer, c.prompt)
        self.val_ex = build_sft_examples(self.val, self.tokenizer, c.prompt)
        self.test_ex = build_sft_examples(self.test, self.tokenizer, c.prompt)

    def loglik(self, examples, problems) -> list:
        from cca_fast.evaluation.gold_loglik import gold_loglik_examples

        return gold_loglik_examples(self.model, examples, batch_size=self.config.batch_size,
                                    templates=[p.template for p in problems])

    # ---- scores ------------------------------------------------------------------------------
    def scores(self, name: str) -> torch.Tensor:
        f = self.out / "scores" / f"{name}.pt"
        if f.exists():
            return torch.load(f)
        t = time.perf_counter()
        if name == "atp":
            from cca_fast.stages.localize.atp import AtPConfig, run_atp

            s = run_atp(self.model, self.pivots, AtPConfig(batch_size=8), space=self.space).scores
            got = {"atp": s.detach().to(torch.float64).cpu()}
        elif name in ("fisher", "grad-weight"):
            from cca_fast.stages.localize.objective_scores import gold_gradient_scores

            got = gold_gradient_scores(self.model, self.gold, self.space)
        elif name == "movement":
            from cca_fast.stages.localize.objective_scores import movement_scores

            got = {"movement": movement_scores(self.model, self.gold, self.space, self.config.movement)}
        else:
            raise CCAError(f"no score named {name!r}")
        f.parent.mkdir(parents=True, exist_ok=True)
        for k, v in got.items():
            tmp = f.with_name(f".{k}.pt.tmp")
            torch.save(v, tmp)
            tmp.replace(f.with_name(f"{k}.pt"))
        timing = self.out / "scores" / "seconds.json"
        sec = read_json(timing) if timing.exists() else {}
        sec[name] = time.perf_counter() - t
        atomic_write_json(timing, sec)
        return got[name]

    def selection(self, cond: dict[str, Any]):
        from cca_fast.models.adapters import KINDS
        from cca_fast.stages.localize.select import Selection, select_per_kind, select_random

        budget = {k: cond["budget"] for k in KINDS}
        if cond["selector"] in SELECTOR_NAMES:
            return select_per_kind(self.scores(cond["selector"]), self.space, budget, anti=cond["anti"],
                                   method=cond["selector"])
        if cond["selector"] == "random":
            from cca_fast.stages.localize.select import kind_budget_counts

            return select_random(self.space, kind_budget_counts(self.space, budget), seed=cond["seed"])
        like_file = self.out / "conditions" / f"{cond['like']}.json"
        like = (Selection.from_dict(read_json(like_file)["selection"]) if like_file.exists()
                else self.selection({"selector": cond["like"].split("@")[0], "budget": cond["budget"], "anti": False}))
        return select_random(self.space, like, seed=cond["seed"], match_layers=True)

    # ---- one condition -------------------------------------------------------------------------
    def base(self) -> dict[str, Any]:
        f = self.out / "base.json"
        if not f.exists():
            t = time.perf_counter()
            val = self.loglik(self.val_ex, self.val)
            test = self.loglik(self.test_ex, self.test)
            atomic_write_json(f, {"val": [r.to_dict() for r in val], "test": [r.to_dict() for r in test],
                                  "seconds": time.perf_counter() - t})
        return read_json(f)

    def run_condition(self, cond: dict[str, Any]) -> dict[str, Any]:
        from cca_fast.delta import apply_delta, revert_delta
        from cca_fast.evaluation.gold_loglik import summarize_loglik
        from cca_fast.stages.update import run_update

        t = time.perf_counter()
        base_val = self.base()["val"]
        sel = self.selection(cond)

        calls = []

        def validate(model) -> float:  # the step: highest validation gold log-likelihood (0 = base)
            calls.append(1)
            if len(calls) == 1:  # step 0: the base weights, whose score base.json holds
                return summarize_loglik([_rec(r) for r in base_val])["mean_logprob"]
            return summarize_loglik(self.loglik(self.val_ex, self.val))["mean_logprob"]

        sweep = []
        for lr in self.config.lrs or [self.config.update.lr]:
            calls.clear()
            result = run_update(self.model, self.space, sel, [], dataclasses.replace(self.config.update, lr=lr),
                                validate=validate, gold=self.gold)
            revert_delta(self.model, result.delta)
            best_val = next((h["val"] for h in result.history if h.get("step") == result.best_step and "val" in h),
                            float("-inf"))
            sweep.append({"lr": lr, "best_step": result.best_step, "best_val": best_val, "history": result.history,
                          "delta": result.delta})
        chosen = max(sweep, key=lambda r: r["best_val"])  # the first of equal scores: the rates' order
        handle = apply_delta(self.model, chosen["delta"])
        test = self.loglik(self.test_ex, self.test)
        revert_delta(self.model, handle)
        rows = self.space.owned_rows(sel.indices)
        params = dict(self.model.named_parameters())
        n_params = sum(r.index.numel() * params[n].numel() // params[n].shape[r.dim] for n, r in rows.items())
        n_kind = {k: self.space.n_layers * self.space.counts[k] for k in self.space.counts}
        rec = {**cond, "selection": sel.to_dict(), "counts": sel.counts,
               "kind_share": {k: sel.counts[k] / n_kind[k] for k in n_kind},
               "parameters": n_params, "parameter_share": n_params / sum(p.numel() for p in params.values()),
               "lr": chosen["lr"], "best_step": chosen["best_step"],
               "base_val": summarize_loglik([_rec(r) for r in base_val])["mean_logprob"],
               "history": chosen["history"], "test": [r.to_dict() for r in test], "seconds": time.perf_counter() - t}
        if self.config.lrs:
            rec["lr_sweep"] = [{k: v for k, v in r.items() if k != "delta"} for r in sweep]
        atomic_write_json(self.out / "conditions" / f"{cond['name']}.json", rec)
        return rec


def _rec(d: dict[str, Any]):
    from cca_fast.evaluation.gold_loglik import GoldLoglik

    return GoldLoglik(**d)


def pending(config: BudgetCurveConfig) -> list[str]:
    """The conditions not yet written."""
    d = Path(config.output) / "conditions"
    return [c["name"] for c in config.conditions() if not (d / f"{c['name']}.json").exists()]


def run_budget_curve(config: BudgetCurveConfig, *, limit: int | None = None, progress: bool = True) -> list[str]:
    """Run (or resume) up to ``limit`` pending conditions (all: ``None``); returns those still
    pending. Writes the report when none is left."""
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    from cca_fast.experiments.rundir import RunDir

    check_or_write_config(out / RunDir.CONFIG, config.to_dict(), BudgetCurveConfig().to_dict(), "budget curve")
    todo = [c for c in config.conditions() if c["name"] in set(pending(config))]
    if todo:
        s = _Session(config)
        for cond in todo[: limit if limit is not None else len(todo)]:
            if progress:
                print(f"budget curve: {cond['name']}", flush=True)
            s.run_condition(cond)
    left = pending(config)
    if not left:
        write_report(config)
    return left


# ---- the report -----------------------------------------------------------------------------------
def build_study(config: BudgetCurveConfig, *, n_resamples: int = 10_000, level: float = 0.95) -> dict[str, Any]:
    """``study.json``: per budget, each condition's test gold log-likelihood (mean nats per
    problem) and its paired difference to the base; each selector's and anti-selection's
    difference to the pooled kinds-matched random draws (and to the layer-matched ones), with
    intervals over problems and draws (:meth:`StratifiedBootstrap.pooled_difference`); the
    spread of the random draws. Conditions not yet run are listed as pending."""
    from cca_fast.evaluation.stats import StratifiedBootstrap

    out = Path(config.output)
    base = read_json(out / "base.json")
    ids = [r["id"] for r in base["test"]]
    bs = StratifiedBootstrap([r["template"] for r in base["test"]], n_resamples=n_resamples, seed=config.seed)
    base_lp = [r["logprob"] for r in base["test"]]

    def lp(rec: dict[str, Any]) -> list[float]:
        by = {r["id"]: r["logprob"] for r in rec["test"]}
        return [by[i] for i in ids]

    done = {c["name"]: read_json(out / "conditions" / f"{c['name']}.json") for c in config.conditions()
            if (out / "conditions" / f"{c['name']}.json").exists()}
    rows: list[dict[str, Any]] = []
    for name, rec in done.items():
        d = bs.difference(lp(rec), base_lp, level)
        rows.append({"name": name, "selector": rec["selector"] + ("-anti" if rec.get("anti") else ""),
                     "budget": rec["budget"], "counts": rec["counts"], "kind_share": rec["kind_share"],
                     "parameters": rec["parameters"], "parameter_share": rec["parameter_share"],
                     "lr": rec.get("lr", config.update.lr), "best_step": rec["best_step"], "vs_base": d.to_dict(),
                     "seconds": rec["seconds"]})
    comparisons: list[dict[str, Any]] = []
    for b in config.budgets + [x for x in (config.layer_budgets or []) if x not in config.budgets]:
        pools = {kind: [lp(r) for r in done.values() if r["selector"] == kind and r["budget"] == b]
                 for kind in ("random", "random-layers")}
        for rec in done.values():
            if rec["budget"] != b or rec["selector"] not in SELECTOR_NAMES:
                continue
            for kind, pool in pools.items():
                if len(pool) >= 1:
                    iv = bs.pooled_difference(lp(rec), pool, level, seed=config.seed)
                    comparisons.append({"condition": rec["name"], "budget": b, "against": kind, "draws": len(pool),
                                        "difference": iv.to_dict(), "above_zero": iv.low > 0, "below_zero": iv.high < 0})
    spread = {}
    for b in config.budgets:
        means = [r["vs_base"]["value"] for r in rows if r["selector"] == "random" and r["budget"] == b]
        if means:
            import statistics

            spread[f"{b:g}"] = {"draws": len(means), "mean": statistics.fmean(means), "min": min(means),
                                "max": max(means), "sd": statistics.stdev(means) if len(means) > 1 else 0.0}
    return {"metric": "test gold-solution log-likelihood, nats per problem (template-averaged mean), paired",
            "n_test": len(ids), "n_val": len(base["val"]), "n_train": config.n_train,
            "base_mean_logprob": bs.accuracy(base_lp, level).to_dict(),
            "config": config.to_dict(), "conditions": rows, "vs_random": comparisons, "random_spread": spread,
            "pending": pending(config), "level": level, "n_resamples": n_resamples,
            "accuracy": accuracy_section(out, done, level=level, n_resamples=n_resamples, seed=config.seed),
            "accuracy_split": accuracy_section(out, done, split_only=True, level=level, n_resamples=n_resamples,
                                               seed=config.seed),
            "side_effects": side_effect_section(out)}


def write_report(config: BudgetCurveConfig, *, study: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``study.json``, ``study.md`` and ``study.png`` (whatever conditions are done)."""
    from cca_fast.experiments.rundir import StudyDir

    sd = StudyDir(config.output)  # the study table's names
    study = study or build_study(config)
    atomic_write_json(sd.study_json, study)
    atomic_write_text(sd.study_md, render_markdown(study))
    plot(study, sd.study_png)
    return study
