"""``cca study``: does CCA work on this model? Base, CCA per selector, the random control, the
no-mask update and LoRA, on the same seeded splits, with side effects, in one resumable command.

Study directory layout::

    OUTPUT/study_config.json      the StudyConfig (a resumed study must use the same one)
    OUTPUT/shared/                a `cca run` directory holding the steps every condition shares:
                                  data splits, base evaluation, traces, pivots
    OUTPUT/<condition>/           one complete `cca run` directory per CCA condition (the selectors,
                                  `random`, `none`), seeded with copies of the shared steps
    OUTPUT/lora/                  the LoRA baseline: adapter/, lora.json, eval_test.jsonl
    OUTPUT/side_effects/<c>.json  side-effect suites of each condition (and `base`)
    OUTPUT/study.json, study.md, study.png   the comparison table
    OUTPUT/phases.json            seconds per phase

Every condition sees the same training examples (pivots), validation and test problems; the
random control selects as many components as the selector named by ``random_like``. Test accuracy
intervals are the stratified bootstrap over test problems (:mod:`cca_fast.evaluation.stats`); differences
are paired on the same problems.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cca_fast.baselines.lora.train import LoRAConfig
from cca_fast.errors import CCAError
from cca_fast.evaluation.suites import SuiteConfig
from cca_fast.experiments import config_io
from cca_fast.experiments.config import SELECTORS, GenerationSettings, RunConfig
from cca_fast.experiments.pipeline import run_cca
from cca_fast.experiments.report import RunReport
from cca_fast.experiments.rundir import RunDir, StudyDir
from cca_fast.experiments.steps import RunContext, outputs_through
from cca_fast.experiments.steps.data import DataStep
from cca_fast.io import add_seconds, atomic_write_json, check_or_write_config, read_json

#: the step the shared run stops after, and the files of a run directory it writes
SHARED_UNTIL = "pivots"
SHARED_FILES = outputs_through(SHARED_UNTIL)
SHARED_STEPS = ("load_model", "data", "base_eval", "traces", "pivots")
CONTROLS = ("random", "none", "lora")
#: keys of a study variant that are not RunConfig overrides
VARIANT_KEYS = ("random_like", "match_kinds", "match_layers", "seeds", "label")


def study_run_defaults() -> RunConfig:
    """The study-size :class:`RunConfig` (``StudyConfig().run``, the ``cca study`` defaults): at
    least 200 test problems on the built-in data (34 templates x 6); stage-2/3 settings chosen
    for SmolLM2-135M without looking at test problems (README, "The study"): lr from the
    training-set gradient (the paper's 1e-4 moves the training logit difference by 0.003 per
    step), the step by validation accuracy; 100 DCM epochs so that masks can cross 0.5."""
    base = RunConfig()
    return dataclasses.replace(base, n_per_template=15, max_train_problems=48, max_val_problems=None,
                               generation=GenerationSettings(base.generation.max_new_tokens, batch_size=16),
                               update=dataclasses.replace(base.update, lr=1e-3, max_steps=10),
                               dcm=dataclasses.replace(base.dcm, epochs=100))


def study_suite_defaults() -> SuiteConfig:
    """The side-effect suites' sizes of a study (MMLU 114 questions stratified by subject,
    TruthfulQA 100, GSM8K perplexity 50 solutions)."""
    return SuiteConfig(mmlu_limit=114, truthfulqa_limit=100, ppl_limit=50)


@dataclass
class StudyConfig:
    """What a study compares (written to ``study_config.json``).

    Attributes:
        output: the study directory.
        run: the shared :class:`RunConfig` (model, data, prompt, decoding, stage settings); its
            ``output``, ``selector`` and ``select_*`` fields are set per condition.
        selectors: CCA selectors to compare (``dcm``, ``atp-topk``, ``atp-fraction``).
        select_fraction: fraction for ``atp-fraction``; ``select_k``: k for ``atp-topk``.
        controls: any of ``random`` (same number of components as ``random_like``'s selection),
            ``none`` (the same update on every weight) and ``lora`` (LoRA on the gold solutions).
        random_like: the selector whose component count the random control copies.
        lora: the LoRA baseline's :class:`cca_fast.baselines.lora.train.LoRAConfig`.
        side_effects: run the side-effect suites before and after.
        suites: the suites' :class:`cca_fast.evaluation.suites.SuiteConfig` (limits, data root).
        bootstrap: bootstrap resamples for the intervals; ``level``: their coverage.
        variants: further conditions by name, each a dict of :class:`RunConfig` overrides applied
            to ``run`` (``{"selector": "atp-fraction", "select_fraction": 0.02, "update":
            {"objective": "gold_nll"}}``; :data:`cca_fast.experiments.recipes.RECIPES` holds the
            named ones). Three extra keys: ``"random_like": NAME`` makes the variant a random
            control drawing as many components as condition ``NAME`` selected (with the variant's
            other settings), ``"match_kinds": True`` as many of each kind (hence as many
            parameters), ``"match_layers": True`` as many of each kind in every layer, and
            ``"label"`` is its name in the table. They run after the selectors and
            controls, in order. A random variant is a *distribution*: ``"seeds": N`` (default
            ``random_seeds``) draws, conditions ``NAME`` (draw 0), ``NAME-s1`` ... ``NAME-s{N-1}``
            (``RunConfig.select_seed``; the same splits, traces and pivots); the table compares
            the selector with their pool (:meth:`~cca_fast.evaluation.stats.StratifiedBootstrap.pooled_difference`).
        random_seeds: draws of each random variant without ``"seeds"`` (at least 5 by default:
            one draw is not a control distribution).
    """

    output: str = "runs/study"
    run: RunConfig = field(default_factory=study_run_defaults)
    selectors: list[str] = field(default_factory=lambda: ["dcm", "atp-fraction"])
    select_fraction: float | None = 0.02
    select_k: int | None = None
    controls: list[str] = field(default_factory=lambda: list(CONTROLS))
    random_like: str = "atp-fraction"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    side_effects: bool = True
    suites: SuiteConfig = field(default_factory=study_suite_defaults)
    bootstrap: int = 10_000
    level: float = 0.95
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    random_seeds: int = 5

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`CCAError` naming the setting and the fix if one is invalid; every
        condition's :class:`RunConfig` is built (and so checked) too, before anything runs."""
        for name, kind in (("run", RunConfig), ("lora", LoRAConfig), ("suites", SuiteConfig)):
            if not isinstance(getattr(self, name), kind):
                raise CCAError(f"StudyConfig.{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}: "
                               f"pass {kind.__name__}(...), or use StudyConfig.from_dict({{'{name}': {{...}}}})")
        bad = [s for s in self.selectors if s not in SELECTORS or s in ("random", "none")]
        if bad or not (self.selectors or self.variants):
            raise CCAError(f"study selectors must be among dcm, atp-topk, atp-fraction (got {self.selectors}); "
                           "the random control and the no-mask update are --controls")
        if len(set(self.selectors)) != len(self.selectors):
            raise CCAError(f"duplicate selectors: {self.selectors}")
        badc = [c for c in self.controls if c not in CONTROLS]
        if badc:
            raise CCAError(f"unknown controls {badc}; choose among {', '.join(CONTROLS)}")
        self._check_variants()
        if "random" in self.controls and self.random_like not in self.selectors:
            raise CCAError(f"the random control copies the size of the {self.random_like!r} selection, which is "
                           f"not among the selectors {self.selectors} (set --random-like)")
        if "atp-fraction" in self.selectors and not self.select_fraction:
            raise CCAError("selector atp-fraction needs --select-fraction F")
        if "atp-topk" in self.selectors and not self.select_k:
            raise CCAError("selector atp-topk needs --select-k K")
        from cca_fast import checks

        checks.positive("StudyConfig.bootstrap", self.bootstrap, flag="--bootstrap")
        checks.positive("StudyConfig.random_seeds", self.random_seeds, flag="--random-seeds")
        if not isinstance(self.output, str) or not self.output.strip():
            raise CCAError(f"StudyConfig.output (--output) must name the study directory, got {self.output!r}")
        if not 0 < self.level < 1:
            raise CCAError(f"StudyConfig.level must be in (0, 1), got {self.level!r}")
        self.lora.check()
        self.run.validate()
        for name in ("shared", *self.condition_names()):
            self.run_config(name, random_count=1).validate()

    def _check_variants(self) -> None:
        if not isinstance(self.variants, dict):
            raise CCAError(f"StudyConfig.variants must be a dict of name -> RunConfig overrides, got "
                           f"{type(self.variants).__name__}")
        taken = {"base", "shared", "lora", "side_effects", *self.selectors, *CONTROLS}
        seen: list[str] = [*self.selectors, *(c for c in self.controls if c in ("random", "none"))]
        for name, spec in self.variants.items():
            if not isinstance(name, str) or not name or name in taken or "/" in name:
                raise CCAError(f"study variant name {name!r} is empty, has a '/', or is taken by a condition "
                               f"({', '.join(sorted(taken))})")
            if not isinstance(spec, dict):
                raise CCAError(f"study variant {name!r} must be a dict of RunConfig overrides, got {spec!r}")
            like = spec.get("random_like")
            if like is not None and like not in seen:
                raise CCAError(f"study variant {name!r}: random_like={like!r} must name a selector or an earlier "
                               f"variant ({', '.join(seen) or 'none'})")
            if like is not None and "seeds" in spec:
                from cca_fast import checks

                checks.positive(f"study variant {name!r} seeds", spec["seeds"])
            seen.append(name)

    def seeds_of(self, name: str) -> list[str]:
        """The conditions of variant ``name``: itself, and for a random variant its further draws
        ``name-s1`` ... (see ``variants``)."""
        spec = self.variants.get(name, {})
        if not spec.get("random_like"):
            return [name]
        n = int(spec.get("seeds", self.random_seeds))
        return [name] + [f"{name}-s{i}" for i in range(1, n)]

    def draw_of(self, name: str) -> tuple[str, int | None]:
        """``(variant, draw seed)`` of a condition name (``(name, None)`` when it is no draw)."""
        if name in self.variants:
            return name, (0 if self.variants[name].get("random_like") else None)
        head, _, tail = name.rpartition("-s")
        if head in self.variants and tail.isdigit() and name in self.seeds_of(head):
            return head, int(tail)
        return name, None

    def random_partners(self) -> dict[str, list[str]]:
        """``{condition: its random controls}``: each selector -> ``["random"]`` (when that control
        runs), each variant named by later variants' ``random_like`` -> those variants (in order;
        a variant of several draws by its first name, :meth:`seeds_of` gives the rest)."""
        out = {s: ["random"] for s in self.selectors if "random" in self.controls}
        for name, spec in self.variants.items():
            if spec.get("random_like"):
                out.setdefault(spec["random_like"], []).append(name)
        return out

    def label(self, name: str) -> str | None:
        """A variant's table label (``None`` for the built-in conditions)."""
        spec = self.variants.get(name)
        return None if spec is None else spec.get("label", name)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-able nested dict (what ``study_config.json`` holds)."""
        return config_io.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base: "StudyConfig | None" = None) -> "StudyConfig":
        """``base`` (default ``StudyConfig()``) with the fields in ``data`` replaced (nested dicts
        merged). Raises :class:`CCAError` on an unknown key."""
        return config_io.from_dict(cls, data, base=base)

    # ---- per condition ---------------------------------------------------------------------
    def condition_names(self) -> list[str]:
        """CCA conditions (run directories), in the order they run."""
        return [*self.selectors, *(c for c in self.controls if c in ("random", "none")),
                *(c for v in self.variants for c in self.seeds_of(v))]

    def run_config(self, name: str, random_count: int | dict[str, int] | None = None) -> RunConfig:
        """The :class:`RunConfig` of condition ``name`` (``"shared"``: the shared steps)."""
        out = str(Path(self.output) / name)
        unset = {"select_k": None, "select_fraction": None, "select_count": None, "select_kinds": None}
        if name == "shared":  # steps up to pivots only: later steps' settings do not enter it
            defaults = RunConfig()
            return dataclasses.replace(self.run, output=out, **unset, selector="dcm", dcm=defaults.dcm,
                                       update=defaults.update, pivot_source=defaults.pivot_source,
                                       pivot_filter=defaults.pivot_filter, fork=defaults.fork,
                                       val_from_train=defaults.val_from_train, diagnostics=defaults.diagnostics)
        if name == "random":
            if random_count is None:
                raise CCAError("the random control needs the count of the selection it controls for")
            return dataclasses.replace(self.run, output=out, **{**unset, "select_count": int(random_count)},
                                       selector="random")
        if name == "none":
            return dataclasses.replace(self.run, output=out, **unset, selector="none")
        variant, draw = self.draw_of(name)
        if variant in self.variants:
            spec = {k: v for k, v in self.variants[variant].items() if k not in VARIANT_KEYS}
            cfg = RunConfig.from_dict(spec, base=dataclasses.replace(self.run, output=out, **unset))
            if self.variants[variant].get("random_like"):
                if random_count is None:
                    raise CCAError(f"variant {name!r} (a random control) needs the count of the selection it "
                                   "controls for")
                if isinstance(random_count, dict) and any(isinstance(v, list) for v in random_count.values()):
                    size = {"select_layer_kinds": {k: list(v) for k, v in random_count.items()}}
                elif isinstance(random_count, dict):
                    size = {"select_kinds": dict(random_count)}
                else:
                    size = {"select_count": int(random_count)}
                cfg = dataclasses.replace(cfg, **{**unset, "select_per_kind": None, "select_anti": False,
                                                  "select_layer_kinds": None, **size},
                                          selector="random", select_seed=cfg.seed + (draw or 0) if draw else None)
            return cfg
        return dataclasses.replace(self.run, output=out, **{
            **unset, "select_fraction": self.select_fraction if name == "atp-fraction" else None,
            "select_k": self.select_k if name == "atp-topk" else None}, selector=name)


def layer_kind_counts(indices: list[int], component_space: dict[str, Any]) -> dict[str, list[int]]:
    """``{kind: [count per layer]}`` of flat component ``indices`` in the component space a run
    report describes (``component_space``: ``n_layers``, ``per_layer``; flat order layer-major,
    then kind, :class:`~cca_fast.models.components.ComponentSpace`)."""
    per, n_layers = dict(component_space["per_layer"]), int(component_space["n_layers"])
    width = sum(per.values())
    out = {k: [0] * n_layers for k in per}
    for i in indices:
        layer, rem = divmod(int(i), width)
        for kind, n in per.items():
            if rem < n:
                out[kind][layer] += 1
                break
            rem -= n
    return out


# ---- the study directory -------------------------------------------------------------------------
def seed_from_shared(shared: Path, target: Path) -> None:
    """Copy the shared steps' files into a condition's run directory (each atomically; files
    already there are kept), and their seconds into its ``stages.json`` so its report counts them."""
    for rel in SHARED_FILES + (RunDir.MODEL_IDENTITY,):  # the identity: a changed model is noticed
        src, dst = shared / rel, target / rel
        if dst.exists() or not src.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp-copy")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
    stages, shared_stages = RunDir(target, create=False).stages, RunDir(shared, create=False).stages
    if not stages.exists() and shared_stages.exists():
        sec = read_json(shared_stages)
        atomic_write_json(stages, {k: v for k, v in sec.items() if k in SHARED_STEPS})


def run_study(config: StudyConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every condition of the study and write the comparison table.

    Returns the ``study.json`` dict (see :func:`cca_fast.experiments.study_report.build_study`).
    """
    config.validate()
    config.run.check_inputs()  # the model name and the exemplar file, before study_config.json is written
    sd = StudyDir(config.output, create=True)
    with sd.lock():
        return _run_study_locked(config, sd, progress)


def _run_study_locked(config: StudyConfig, sd: StudyDir, progress: bool) -> dict[str, Any]:
    """:func:`run_study` while holding the study directory's lock (each condition's run
    directory is locked by :func:`run_cca` in turn)."""
    from cca_fast.experiments.study_report import build_study, write_study

    check_or_write_config(sd.config, config.to_dict(), StudyConfig().to_dict(), f"{sd.path} (a study)")
    phases = sd.phases
    say: Callable[[str], None] = (lambda m: print(m, flush=True)) if progress else (lambda m: None)

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        result = fn()
        add_seconds(phases, name, time.perf_counter() - t)
        return result

    shared = sd.shared()
    if not shared.pivots.exists() or not shared.base_test.exists():
        say("study: shared steps (data, base evaluation, traces, pivots)")
        timed("shared", lambda: run_cca(config.run_config("shared"), until=SHARED_UNTIL, progress=progress))
    else:  # resume the shared run's steps (finished ones are not recomputed)
        run_cca(config.run_config("shared"), until=SHARED_UNTIL, progress=progress)

    if not sd.model_info.exists():
        model, _ = _load(config)
        atomic_write_json(sd.model_info, {"n_params": sum(p.numel() for p in model.parameters()),
                                                    "model_type": model.config.model_type})
        del model

    reports: dict[str, RunReport] = {}
    for name in config.condition_names():
        target = sd.condition(name)
        report_path = target / RunDir.REPORT_JSON
        if report_path.exists():
            reports[name] = RunReport.from_dict(read_json(report_path))
            continue
        count = None
        if name == "random":
            count = reports[config.random_like].components_selected
        elif config.variants.get(config.draw_of(name)[0], {}).get("random_like"):
            spec = config.variants[config.draw_of(name)[0]]
            like = reports[spec["random_like"]]
            if spec.get("match_layers"):
                count = layer_kind_counts(read_json(sd.condition(spec["random_like"]).selection)["indices"],
                                          like.component_space)
            else:
                count = dict(like.per_kind) if spec.get("match_kinds") else like.components_selected
        seed_from_shared(shared.path, target.path)
        say(f"study: condition {name}")
        reports[name] = timed(name, lambda: run_cca(config.run_config(name, count), progress=progress))

    if "lora" in config.controls:
        timed("lora", lambda: run_lora_condition(config, progress=progress))

    if config.side_effects:
        timed("side_effects", lambda: run_side_effects(config, progress=progress))

    _, val, test = study_problems(config)
    study = build_study(config, sd, val, test, table_names(config), read_json(phases) if phases.exists() else {})
    write_study(sd, study)
    say(f"study: table in {sd.study_md}")
    return study


# ---- LoRA ------------------------------------------------------------------------------------------
def study_problems(config: StudyConfig):
    """``(training problems, validation problems, test problems)`` of the study, read from the
    shared run directory: the training problems CCA's stage 1 used (``training_set.json``), the
    validation and test problems every condition is selected and scored on (the data step's)."""
    from cca_fast.experiments.steps.update import validation_problems

    rd = StudyDir(config.output).shared()
    splits = DataStep().load(RunContext(config.run_config("shared"), rd))
    if splits is None:
        raise CCAError(f"{rd.path} has no data splits: run the study's shared steps first")
    by_id = {p.id: p for p in splits.train}
    chosen = [by_id[i] for i in rd.read_training_set()["problem_ids"]]
    return chosen, validation_problems(config.run, splits, [p.id for p in chosen]), splits.test


def _load(config: StudyConfig):
    from cca_fast.models.loading import load_model

    r = config.run
    return load_model(r.model, dtype=r.dtype, device=r.device, attn_implementation=r.attn_implementation)


def _prompt_and_gen(config: StudyConfig):
    return config.run.prompt, config.run.generation.config()


def run_lora_condition(config: StudyConfig, *, progress: bool = True) -> None:
    """Train LoRA on the gold solutions of the study's training problems (best epoch by
    validation accuracy), then evaluate it on the test problems (resumable)."""
    from cca_fast.evaluation.evaluate import summarize
    from cca_fast.baselines.lora.train import load_lora, merge_lora, train_lora
    from cca_fast.experiments.steps.evaluation import eval_resumable

    sd = StudyDir(config.output)
    sd.lora.mkdir(parents=True, exist_ok=True)
    chosen, val, test = study_problems(config)
    prompt, gen = _prompt_and_gen(config)
    if not sd.lora_info.exists():
        model, tok = _load(config)

        def validate(m) -> float:
            return summarize(eval_resumable(m, tok, val, prompt, gen, None, "validation", False, keep_ids=False))["accuracy"]

        t = time.perf_counter()
        result = train_lora(model, tok, chosen, prompt, config.lora, validate=validate, progress=progress)
        result.save(sd.lora_adapter)
        info = result.summary() if hasattr(result, "summary") else {}
        info.update({"n_train_problems": len(chosen), "seconds": time.perf_counter() - t})
        atomic_write_json(sd.lora_info, info)
        del model
    model, tok = _load(config)
    handle = merge_lora(model, load_lora(sd.lora_adapter))
    eval_resumable(model, tok, test, prompt, gen, sd.lora_test, "LoRA eval (test)", progress, keep_ids=False)
    handle.restore()


# ---- side effects --------------------------------------------------------------------------------
def _apply_condition(model, config: StudyConfig, name: str) -> None:
    """Put ``model`` (a freshly loaded base) into condition ``name`` (callers load a fresh model
    per condition: the no-mask delta holds no base rows to revert to)."""
    sd = StudyDir(config.output)
    if name == "base":
        return
    if name == "lora":
        from cca_fast.baselines.lora.train import load_lora, merge_lora

        merge_lora(model, load_lora(sd.lora_adapter))
        return
    from cca_fast.delta import SparseDelta, apply_delta

    apply_delta(model, SparseDelta.load(sd.condition(name).delta))


def _kept_base_weights(config: StudyConfig, name: str) -> bool:
    """Whether model selection kept the base weights (best update step / LoRA epoch 0)."""
    sd = StudyDir(config.output)
    if name == "lora":
        f = sd.lora_info
        return f.exists() and read_json(f).get("best_epoch") == 0
    f = sd.condition(name).update
    return f.exists() and read_json(f).get("best_step") == 0


def table_names(config: StudyConfig) -> list[str]:
    """The study table's rows: the base, every condition (every draw), LoRA."""
    return ["base", *config.condition_names(), *(["lora"] if "lora" in config.controls else [])]


def side_effect_names(config: StudyConfig) -> list[str]:
    """Conditions the side-effect suites run on: the base, each condition (of a random variant's
    draws only the first), LoRA."""
    first = [c for c in config.condition_names() if config.draw_of(c)[1] in (None, 0)]
    return ["base", *first, *(["lora"] if "lora" in config.controls else [])]


def run_side_effects(config: StudyConfig, *, progress: bool = True) -> None:
    """The side-effect suites on the base model and on every condition (one file each, skipped
    when present)."""
    from cca_fast.evaluation.suites import run_suites

    sd = StudyDir(config.output)
    sd.side_effects.mkdir(parents=True, exist_ok=True)
    suite_cfg = config.suites
    todo = [n for n in side_effect_names(config) if not sd.side_effect(n).exists()]
    for name in todo:
        if name != "base" and _kept_base_weights(config, name) and sd.side_effect("base").exists():
            # validation kept step 0: the condition's weights are the base's, bit for bit
            # (run_update restores the snapshot), so its suite results are the base's
            result = read_json(sd.side_effect("base"))
            result["same_weights_as"] = "base"
            atomic_write_json(sd.side_effect(name), result)
            continue
        model, tok = _load(config)
        _apply_condition(model, config, name)
        if progress:
            print(f"study: side effects of {name}", flush=True)
        t = time.perf_counter()
        result = run_suites(model, tok, suite_cfg)
        result["seconds"] = time.perf_counter() - t
        atomic_write_json(sd.side_effect(name), result)
        del model
