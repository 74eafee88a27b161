"""``cca run``: every stage of CCA end to end, resumable from a run directory.

Run directory layout (one file per stage output; a stage whose output exists is not recomputed):

=======================  =====================================================================
``config.json``          the :class:`RunConfig` (a resumed run must use the same one)
``data/{train,val,test}.jsonl``  the seeded per-template splits
``eval_base_train.jsonl``  greedy traces of the training split (records + token ids; resumable)
``eval_base_test.jsonl``   base model on the test split (resumable)
``traces.jsonl``         stage 1a: greedy trace + first flipped sample per training problem
``pivots.jsonl``         stage 1b: pivot examples (one line per trace pair; resumable)
``selection.json``       stage 2: the selected components
``update.json``          stage 3: history, best step (the delta is in ``delta/``)
``delta/``               the sparse delta (``delta_config.json`` + ``delta.safetensors``)
``eval_cca_test.jsonl``  the updated model (base + delta) on the test split (resumable)
``report.json``, ``report.md``, ``components.png``
``stages.json``          seconds spent per stage
=======================  =====================================================================
"""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence


from cca_fast.data import load_problems, split_problems
from cca_fast.data.loaders import read_problems_jsonl, write_problems_jsonl
from cca_fast.data.problem import Problem
from cca_fast.errors import CCAError
from cca_fast.evaluation.evaluate import summarize
from cca_fast.stages.examples import PivotExample
from cca_fast.generation.decode import GenerationConfig, generate
from cca_fast.io import add_seconds, append_jsonl, atomic_write_json, check_or_write_config, read_json, read_jsonl
from cca_fast.models.components import ComponentSpace
from cca_fast.generation.prefix import PrefixCache
from cca_fast.evaluation.prompting import PromptConfig, build_prompt, encode_prompts
from cca_fast.stages.traces import GreedyTrace, TraceConfig, TracePair, collect_traces

STAGES = ("data", "base_eval", "traces", "pivots", "localize", "update", "cca_eval", "report")
SELECTORS = ("dcm", "atp-topk", "atp-fraction", "random", "none")
PROCEDURES = ("fast", "reference")


@dataclass
class RunConfig:
    """Everything that determines a run's results (written to ``config.json``).

    The defaults are sized for the embedded default model on 2 CPU cores (well under 20 minutes);
    see the README for the paper-size configuration.
    """

    output: str = "runs/cca"
    model: str | None = None
    dtype: str | None = None
    device: str | None = None
    attn_implementation: str = "sdpa"
    data: str | None = None
    n_per_template: int = 8
    seed: int = 0
    weak_threshold: float = 0.8
    max_train_problems: int | None = 12
    max_val_problems: int | None = 12
    max_test_problems: int | None = None
    prompt_mode: str = "plain"
    shots: str | None = None
    n_shots: int = 8
    max_new_tokens: int = 160
    batch_size: int = 16
    trace: TraceConfig = field(default_factory=TraceConfig)
    pivot_method: str = "branching"  # "branching" | "prefix"
    branching: str = "fast"  # "fast" | "reference"
    selector: str = "dcm"
    select_k: int | None = None
    select_fraction: float | None = None
    select_count: int | None = None  # for "random": how many components (else select_fraction)
    dcm: dict[str, Any] = field(default_factory=dict)  # DCMConfig overrides
    update: dict[str, Any] = field(default_factory=dict)  # UpdateConfig overrides
    procedure: str = "fast"  # "fast" | "reference" (the authors' procedure; see ProcedureSettings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        d = dict(d)
        d["trace"] = TraceConfig(**d.get("trace", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CCAError(f"unknown run config keys: {sorted(unknown)}")
        return cls(**d)

    def validate(self) -> None:
        if self.selector not in SELECTORS:
            raise CCAError(f"unknown selector {self.selector!r}; choose one of {', '.join(SELECTORS)}")
        if self.pivot_method not in ("branching", "prefix"):
            raise CCAError(f"unknown pivot method {self.pivot_method!r}; use 'branching' or 'prefix'")
        if self.branching not in ("fast", "reference"):
            raise CCAError(f"unknown branching implementation {self.branching!r}; use 'fast' or 'reference'")
        if self.procedure not in PROCEDURES:
            raise CCAError(f"unknown procedure {self.procedure!r}; use 'fast' (the default fast paths) or "
                           "'reference' (the authors' procedure, for comparisons)")
        if self.selector == "atp-topk" and not self.select_k:
            raise CCAError("--selector atp-topk needs --select-k N")
        if self.selector == "atp-fraction" and not self.select_fraction:
            raise CCAError("--selector atp-fraction needs --select-fraction F")
        if self.selector == "random" and not (self.select_count or self.select_fraction):
            raise CCAError("--selector random needs --select-count N or --select-fraction F "
                           "(use the count of the selection it controls for)")


@dataclass(frozen=True)
class ProcedureSettings:
    """The stage settings a run actually uses, after ``RunConfig.procedure``.

    ``procedure="fast"``: the configuration as given. ``procedure="reference"``: the authors'
    procedure, the same results by the slow path (for benchmarks and checks), overriding:

    * generation: one sequence at a time (``batch_size=1``), no shared-prefix prefill, no early
      stop (``max_new_tokens`` decoded, the output cut where the stop rule would have stopped:
      the same generations, see :mod:`cca_fast.generation.decode`); the flipped-trace search draws its
      samples one at a time (``TraceConfig.sample_batch=1``; the first flip in order is kept
      either way);
    * pivots: the literal per-position branching loop (``branching="reference"``);
    * DCM: ``mode="full"`` (the whole prefix re-run at every step; no prefix cache exists in
      that mode, so ``reuse_prefix_cache`` only keeps fixing the batch schedule, which must be
      the fast run's for the same masks);
    * update: ``mode="reference"`` (dense gradients for every weight, selected rows copied),
      and ``share_prefix=False`` where :class:`~cca_fast.stages.update.UpdateConfig` has it.

    Attributes:
        generation: :class:`~cca_fast.generation.decode.GenerationConfig` keyword arguments.
        trace: the stage-1 sampling configuration.
        branching: ``"fast"`` or ``"reference"``.
        dcm: :class:`~cca_fast.stages.localize.dcm.DCMConfig` overrides.
        update: :class:`~cca_fast.stages.update.UpdateConfig` overrides.
    """

    generation: dict[str, Any]
    trace: TraceConfig
    branching: str
    dcm: dict[str, Any]
    update: dict[str, Any]


def procedure_settings(config: RunConfig) -> ProcedureSettings:
    """The effective stage settings of ``config`` (see :class:`ProcedureSettings`)."""
    gen = {"max_new_tokens": config.max_new_tokens, "batch_size": config.batch_size}
    if config.procedure != "reference":
        return ProcedureSettings(gen, config.trace, config.branching, dict(config.dcm), dict(config.update))
    from cca_fast.stages.update import UpdateConfig

    update = {**config.update, "mode": "reference"}
    if "share_prefix" in {f.name for f in dataclasses.fields(UpdateConfig)}:
        update["share_prefix"] = False
    return ProcedureSettings(
        generation={**gen, "batch_size": 1, "share_prefix": False, "early_stop": False},
        trace=dataclasses.replace(config.trace, sample_batch=1),
        branching="reference",
        dcm={**config.dcm, "mode": "full"},
        update=update,
    )


# ---- the run directory ------------------------------------------------------------------------
class RunDir:
    """Files of one run; stage timings in ``stages.json``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def check_config(self, config: RunConfig) -> None:
        """Write ``config.json``, or check that a resumed run uses the same configuration."""
        check_or_write_config(self / "config.json", config.to_dict(), RunConfig().to_dict(), str(self.path))

    def seconds(self) -> dict[str, float]:
        f = self / "stages.json"
        return read_json(f) if f.exists() else {}

    def record_seconds(self, stage: str, seconds: float) -> None:
        add_seconds(self / "stages.json", stage, seconds)


# ---- resumable greedy evaluation ----------------------------------------------------------------
def eval_resumable(model, tokenizer, problems: Sequence[Problem], prompt: PromptConfig, gen: GenerationConfig,
                   path: Path | None, desc: str, progress: bool = True, keep_ids: bool = True,
                   prefix_cache: PrefixCache | None = None) -> list[dict[str, Any]]:
    """Greedy evaluation records of ``problems`` (aligned), appending each finished chunk to the
    JSON Lines file ``path`` so that an interrupted evaluation resumes. Records carry
    ``prompt_ids`` and ``output_ids`` when ``keep_ids``. ``prefix_cache``: see
    :func:`~cca_fast.generation.decode.generate`."""
    from tqdm.auto import tqdm

    from cca_fast.evaluation.evaluate import score

    done: dict[str, dict[str, Any]] = {}
    if path is not None and path.exists():
        done = {r["id"]: r for r in read_jsonl(path)}
    todo = [p for p in problems if p.id not in done]
    chunk = max(1, gen.batch_size) * 2
    bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=desc, unit="problem",
               disable=not progress)
    try:
        for i in range(0, len(todo), chunk):
            part = todo[i : i + chunk]
            ids = encode_prompts([build_prompt(p.question, prompt, tokenizer) for p in part], tokenizer, prompt)
            gens = generate(model, tokenizer, ids, gen, prefix_cache=prefix_cache)
            records, _, _, _ = score(part, gens)
            for r, g in zip(records, gens):
                if keep_ids:
                    r["prompt_ids"], r["output_ids"] = list(g.prompt_ids), list(g.output_ids)
                done[r["id"]] = r
                if path is not None:
                    append_jsonl(path, r)
            bar.update(len(part))
    finally:
        bar.close()
    return [done[p.id] for p in problems]


# ---- stage helpers ------------------------------------------------------------------------------
def _subset(problems: list[Problem], limit: int | None, seed: int) -> list[Problem]:
    if limit is None or limit >= len(problems):
        return problems
    idx = sorted(random.Random(seed).sample(range(len(problems)), limit))
    return [problems[i] for i in idx]


def training_problems(train: list[Problem], base_train: dict[str, Any], threshold: float,
                      limit: int | None, seed: int) -> tuple[list[Problem], list[str]]:
    """Training problems of *weak* templates (base accuracy below ``threshold``); without
    templates, every training problem. At most ``limit`` of them (a seeded subset)."""
    per = base_train["per_template"]
    if set(per) == {""}:
        weak, chosen = [], list(train)
    else:
        weak = sorted(t for t, v in per.items() if v["accuracy"] < threshold)
        chosen = [p for p in train if p.template in set(weak)]
    return _subset(chosen, limit, seed), weak


def find_pivots(model, tokenizer, pairs: Sequence[TracePair], method: str, branching: str,
                gen: GenerationConfig, path: Path | None, progress: bool = True,
                prefix_cache: PrefixCache | None = None) -> tuple[list[PivotExample], dict]:
    """Stage 1b over flipped pairs, appending one line per pair to ``path`` (resumable).
    Returns the examples and totals of what the search cost."""
    from tqdm.auto import tqdm

    from cca_fast.stages.pivots.search import pivot_for_pair

    done: dict[str, dict[str, Any]] = {}
    if path is not None and path.exists():
        done = {r["problem_id"]: r for r in read_jsonl(path)}
    flipped = [p for p in pairs if p.flipped]
    for pair in tqdm([p for p in flipped if p.problem_id not in done], desc=f"stage 1: pivots ({method})",
                     disable=not progress):
        example, stats = pivot_for_pair(model, tokenizer, pair, method, branching, gen, prefix_cache=prefix_cache)
        rec = {"problem_id": pair.problem_id, "example": example.to_dict() if example else None,
               "stats": asdict(stats)}
        done[pair.problem_id] = rec
        if path is not None:
            append_jsonl(path, rec)
    examples, totals = [], {"pairs": len(flipped), "completions": 0, "generated_tokens": 0, "no_pivot": 0}
    for pair in flipped:
        rec = done[pair.problem_id]
        totals["completions"] += rec["stats"]["completions"]
        totals["generated_tokens"] += rec["stats"]["generated_tokens"]
        if rec["example"] is None:
            totals["no_pivot"] += 1
        else:
            examples.append(PivotExample.from_dict(rec["example"]))
    return examples, totals


def localize(model, space: ComponentSpace, examples: Sequence[PivotExample], config: RunConfig,
             progress: bool = True):
    """Stage 2: the :class:`~cca_fast.stages.localize.select.Selection` of ``config.selector``."""
    from cca_fast.stages.localize.atp import AtPConfig, run_atp
    from cca_fast.stages.localize.dcm import DCMConfig, run_dcm
    from cca_fast.stages.localize.select import select

    sel = config.selector
    if sel == "dcm":
        result = run_dcm(model, examples, DCMConfig(**procedure_settings(config).dcm), progress=progress,
                         space=space)
        selection = select("dcm", space, mask=result.mask, threshold=result.config.threshold)
        selection.params.update({"epochs": result.epochs, "stopped_early": result.stopped_early})
        return selection
    if sel in ("atp-topk", "atp-fraction"):
        scores = run_atp(model, examples, AtPConfig(batch_size=config.batch_size), progress=progress, space=space)
        return select(sel, space, scores=scores, k=config.select_k, fraction=config.select_fraction)
    if sel == "random":
        count = config.select_count or max(1, round(config.select_fraction * space.total))
        return select("random", space, like=int(count), seed=config.seed)
    raise CCAError(f"selector {sel!r} selects nothing")


def _progress_fn(progress: bool) -> Callable[[str], None]:
    return (lambda msg: print(msg, flush=True)) if progress else (lambda msg: None)


# ---- the run -------------------------------------------------------------------------------------
def run_cca(config: RunConfig, *, until: str | None = None, progress: bool = True) -> dict[str, Any] | None:
    """Run (or resume) every stage of CCA; returns the report (``None`` when stopped by ``until``).

    Args:
        config: the run's :class:`RunConfig`; ``config.output`` is the run directory.
        until: stop after this stage (one of :data:`STAGES`).
    """
    from cca_fast.delta import SparseDelta, apply_delta
    from cca_fast.stages.localize.select import Selection
    from cca_fast.models.loading import load_model
    from cca_fast.stages.update import UpdateConfig, run_update

    config.validate()
    if until is not None and until not in STAGES:
        raise CCAError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
    say = _progress_fn(progress)
    rd = RunDir(config.output)
    rd.check_config(config)

    def stop(stage: str) -> bool:
        return until == stage

    t = time.perf_counter()
    model, tok = load_model(config.model, dtype=config.dtype, device=config.device,
                            attn_implementation=config.attn_implementation)
    space = ComponentSpace(model)
    prompt = PromptConfig(mode=config.prompt_mode, exemplars=config.shots, n_shots=config.n_shots)
    proc = procedure_settings(config)
    gen = GenerationConfig(**proc.generation)
    # the exemplars' key/values, computed once per weights (unused by the reference procedure,
    # which shares no prefix); every stage below passes it to its generation calls
    pcache = PrefixCache()
    rd.record_seconds("load_model", time.perf_counter() - t)

    # data ---------------------------------------------------------------------------------
    data_dir = rd / "data"
    if not (data_dir / "test.jsonl").exists():
        t = time.perf_counter()
        problems = load_problems(config.data, n_per_template=config.n_per_template, seed=config.seed)
        splits = split_problems(problems, seed=config.seed)
        for name in ("train", "val", "test"):
            write_problems_jsonl(getattr(splits, name), data_dir / f"{name}.jsonl")
        rd.record_seconds("data", time.perf_counter() - t)
    train, val, test = (read_problems_jsonl(data_dir / f"{n}.jsonl") for n in ("train", "val", "test"))
    val = _subset(val, config.max_val_problems, config.seed)
    test = _subset(test, config.max_test_problems, config.seed)
    say(f"data: {len(train)} train / {len(val)} val / {len(test)} test problems")
    if stop("data"):
        return None

    # base evaluation (greedy traces of the training split, base test accuracy) -------------------
    t = time.perf_counter()
    base_train_records = eval_resumable(model, tok, train, prompt, gen, rd / "eval_base_train.jsonl",
                                        "base eval (train)", progress, prefix_cache=pcache)
    base_train = summarize(base_train_records)
    base_test = summarize(eval_resumable(model, tok, test, prompt, gen, rd / "eval_base_test.jsonl",
                                         "base eval (test)", progress, keep_ids=False, prefix_cache=pcache))
    rd.record_seconds("base_eval", time.perf_counter() - t)
    say(f"base accuracy: train {base_train['accuracy']:.3f}, test {base_test['accuracy']:.3f}")
    if stop("base_eval"):
        return None

    # stage 1a: flipped traces ---------------------------------------------------------------
    chosen, weak = training_problems(train, base_train, config.weak_threshold, config.max_train_problems,
                                     config.seed)
    if not chosen:
        raise CCAError(f"no training problems: every template has base accuracy >= {config.weak_threshold} "
                       "(raise --weak-threshold, or use harder data)")
    greedy = {r["id"]: GreedyTrace(r["id"], r["prompt_ids"], r["output_ids"], r["output"], bool(r["correct"]))
              for r in base_train_records}
    t = time.perf_counter()
    pairs = collect_traces(model, tok, chosen, greedy, gen, proc.trace, rd / "traces.jsonl", progress,
                           prefix_cache=pcache)
    rd.record_seconds("traces", time.perf_counter() - t)
    say(f"stage 1: {sum(p.flipped for p in pairs)} of {len(pairs)} problems have a flipped sample")
    if stop("traces"):
        return None

    # stage 1b: pivots -----------------------------------------------------------------------
    t = time.perf_counter()
    examples, pivot_stats = find_pivots(model, tok, pairs, config.pivot_method, proc.branching, gen,
                                        rd / "pivots.jsonl", progress, prefix_cache=pcache)
    rd.record_seconds("pivots", time.perf_counter() - t)
    say(f"stage 1: {len(examples)} pivot examples ({pivot_stats['generated_tokens']} tokens generated)")
    if not examples:
        raise CCAError("stage 1 found no pivot examples: raise --max-train-problems or --k, or use data the "
                       "model solves sometimes (both correct and wrong traces are needed)")
    if stop("pivots"):
        return None

    # stage 2: components --------------------------------------------------------------------
    sel_path = rd / "selection.json"
    if config.selector == "none":
        selection = None
    elif sel_path.exists():
        selection = Selection.from_dict(read_json(sel_path))
    else:
        t = time.perf_counter()
        selection = localize(model, space, examples, config, progress)
        atomic_write_json(sel_path, selection.to_dict())
        rd.record_seconds("localize", time.perf_counter() - t)
    if selection is not None:
        say(f"stage 2: {len(selection.indices)} of {space.total} components selected ({selection.counts})")
    if stop("localize"):
        return None

    # stage 3: update ------------------------------------------------------------------------
    delta_dir = rd / "delta"
    model_updated = False  # True while the model in memory holds the update (no-mask baseline)
    if not (rd / "update.json").exists():
        t = time.perf_counter()
        # the no-mask baseline changes every row: its delta is a full model, so no base copy in it
        no_mask = {"scope": "all", "store_base_rows": False} if selection is None else {}
        ucfg = UpdateConfig(**{**proc.update, **no_mask})

        def validate(m) -> float:
            recs = eval_resumable(m, tok, val, prompt, gen, None, "validation", False, keep_ids=False,
                                  prefix_cache=pcache)
            return summarize(recs)["accuracy"]

        result = run_update(model, space, selection.indices if selection is not None else [], examples, ucfg,
                            validate=validate, progress=progress)
        result.delta.meta.update({"selection": selection.to_dict() if selection is not None else None,
                                  "run_config": config.to_dict()})
        result.delta.save(delta_dir)
        if selection is not None:
            from cca_fast.delta import revert_delta

            revert_delta(model, result.delta)  # back to the base: the test stage applies the saved delta
        else:
            model_updated = True
        atomic_write_json(rd / "update.json", {"best_step": result.best_step, "best_val": result.best_val,
                                               "history": result.history, "config": result.config})
        rd.record_seconds("update", time.perf_counter() - t)
    update_info = read_json(rd / "update.json")
    say(f"stage 3: best step {update_info['best_step']} (validation accuracy {update_info['best_val']})")
    if stop("update"):
        return None

    # evaluation of the updated model ----------------------------------------------------------
    t = time.perf_counter()
    if not model_updated:
        apply_delta(model, SparseDelta.load(delta_dir))
    cca_test = summarize(eval_resumable(model, tok, test, prompt, gen, rd / "eval_cca_test.jsonl",
                                        "CCA eval (test)", progress, keep_ids=False))
    rd.record_seconds("cca_eval", time.perf_counter() - t)
    if stop("cca_eval"):
        return None

    # report --------------------------------------------------------------------------------
    from cca_fast.experiments.report import write_report

    history = update_info["history"]
    step0 = next((h for h in history if h.get("step") == 0 and h.get("val") is not None), None)
    n_sel = len(selection.indices) if selection is not None else space.total
    report = {
        "model": config.model or "default (SmolLM2-135M-Instruct)",
        "data": config.data or "builtin",
        "seed": config.seed,
        "selector": config.selector,
        "pivot_method": f"{config.pivot_method}" + (f" ({proc.branching})" if config.pivot_method == "branching" else ""),
        "procedure": config.procedure,
        "base_accuracy": base_test["accuracy"],
        "cca_accuracy": cca_test["accuracy"],
        "base_micro_accuracy": base_test["micro_accuracy"],
        "cca_micro_accuracy": cca_test["micro_accuracy"],
        "n_test": cca_test["n"],
        "base_train_accuracy": base_train["accuracy"],
        "base_val_accuracy": step0.get("val") if step0 else None,
        "best_val_accuracy": update_info["best_val"],
        "best_step": update_info["best_step"],
        "weak_templates": weak,
        "n_train_problems": len(chosen),
        "n_flipped": sum(p.flipped for p in pairs),
        "n_examples": len(examples),
        "pivot_search": pivot_stats,
        "components_selected": n_sel,
        "components_total": space.total,
        "fraction": n_sel / space.total,
        "per_kind": selection.counts if selection is not None else {k: space.counts[k] * space.n_layers for k in space.counts},
        "component_space": space.describe(),
        "delta": str(delta_dir),
        "seconds": rd.seconds(),
    }
    per_layer = (space.layer_kind_counts(selection.indices) if selection is not None
                 else {k: [space.counts[k]] * space.n_layers for k in space.counts})
    write_report(rd.path, report, per_layer, space.counts)
    say(f"CCA: test accuracy {report['base_accuracy']:.3f} -> {report['cca_accuracy']:.3f} "
        f"({n_sel} of {space.total} components); report in {rd.path / 'report.md'}")
    return report
