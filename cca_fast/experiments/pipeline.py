"""``cca run``: every stage of CCA end to end, resumable from a run directory.

:func:`run_cca` checks the :class:`~cca_fast.experiments.config.RunConfig` and, for a new run,
its data splits (an empty one is refused), takes the run directory's lock (one writer), writes (or
checks) ``config.json`` and the identity of the weights behind ``--model``
(``model_identity.json``), runs the data stage, loads the model and runs the other stages of
:mod:`cca_fast.experiments.stages` in order; a stage whose outputs are complete is read back,
not recomputed. The files are named by
:class:`~cca_fast.experiments.rundir.RunDir` (see its module for the layout).

Under ``torchrun --nproc_per_node N`` stage 1's generation (base evaluation of the training and
test splits, trace sampling, branching completions, greedy-path forks) is shared out across the
``N`` ranks by whole generation batches / problems, each computed exactly as one process computes
it; rank 0 gathers the results and alone writes the run directory, so its files are those of one
process. The other ranks return after stage 1 and rank 0 runs stages 2 and 3 alone (see
:mod:`cca_fast.experiments.stages`).

The helpers below are the stages' building blocks (resumable evaluation, the training set, the
pivot search, the selection).
"""
from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from cca_fast.data.problem import Problem
from cca_fast.data.splits import is_untemplated
from cca_fast.distributed import Dist, sharded
from cca_fast.errors import CCAError
from cca_fast.experiments.config import (PROCEDURES, SELECTORS, GenerationSettings, ProcedureSettings,  # noqa: F401
                                         RunConfig, procedure_settings)
from cca_fast.experiments.report import RunReport
from cca_fast.experiments.rundir import RunDir  # noqa: F401
from cca_fast.experiments import stages as _stages
from cca_fast.experiments.stages import STAGE_NAMES, RunContext, run_stages
from cca_fast.generation.decode import GenerationConfig, generate
from cca_fast.generation.prefix import PrefixCache, shared_len, start_unit
from cca_fast.io import append_jsonl, read_jsonl
from cca_fast.models.components import ComponentSpace
from cca_fast.evaluation.prompting import PromptConfig, build_prompt, encode_prompts
from cca_fast.stages.examples import PivotExample
from cca_fast.stages.traces import TracePair

#: the stage names, in order (``--until`` takes one)
STAGES = STAGE_NAMES

__all__ = ["RunConfig", "GenerationSettings", "RunDir", "RunReport", "ProcedureSettings", "procedure_settings", "run_cca", "STAGES",
           "SELECTORS", "PROCEDURES", "eval_resumable", "training_problems", "find_pivots", "localize"]


# ---- resumable greedy evaluation ----------------------------------------------------------------
def eval_resumable(model, tokenizer, problems: Sequence[Problem], prompt: PromptConfig, gen: GenerationConfig,
                   path: Path | None, desc: str, progress: bool = True, keep_ids: bool = True,
                   prefix_cache: PrefixCache | None = None, dist: Dist | None = None) -> list[dict[str, Any]]:
    """Greedy evaluation records of ``problems`` (aligned), appending each finished chunk to the
    JSON Lines file ``path`` so that an interrupted evaluation resumes. Records carry
    ``prompt_ids`` and ``output_ids`` when ``keep_ids``. ``prefix_cache``: see
    :func:`~cca_fast.generation.decode.generate` (emptied before every chunk:
    :func:`~cca_fast.generation.prefix.start_unit`).

    ``dist``: the chunks (``8 * batch_size`` problems each) are shared out across its ranks
    (:func:`cca_fast.distributed.sharded`); every rank returns every record and only rank 0
    writes ``path``, in the order one process writes it."""
    from tqdm.auto import tqdm

    from cca_fast.evaluation.evaluate import score

    dist = dist or Dist()
    done: dict[str, dict[str, Any]] = {}
    if path is not None and path.exists():
        done = {r["id"]: r for r in read_jsonl(path)}
    todo = [p for p in problems if p.id not in done]
    if prefix_cache is not None and gen.share_prefix:  # the exemplars: once per weights, the same for every chunk
        every = encode_prompts([build_prompt(p.question, prompt, tokenizer) for p in problems], tokenizer, prompt)
        prefix_cache.pin(every[0][:shared_len(every, gen.min_shared_prefix)])
    size = max(1, gen.batch_size) * 8
    chunks = [todo[i : i + size] for i in range(0, len(todo), size)]

    def evaluate(part: list[Problem]) -> list[dict[str, Any]]:
        start_unit(prefix_cache)
        ids = encode_prompts([build_prompt(p.question, prompt, tokenizer) for p in part], tokenizer, prompt)
        gens = generate(model, tokenizer, ids, gen, prefix_cache=prefix_cache)
        records, _, _, _ = score(part, gens)
        for r, g in zip(records, gens):
            if keep_ids:
                r["prompt_ids"], r["output_ids"] = list(g.prompt_ids), list(g.output_ids)
        return records

    bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=desc, unit="problem",
               disable=not (progress and dist.main))
    try:
        for part, records in sharded(dist, chunks, evaluate):
            for r in records:
                done[r["id"]] = r
                if path is not None and dist.main:
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
    templates, every training problem. At most ``limit`` of them (a seeded subset).

    Extra training problems (``RunConfig.extra_train_data``) are groups of their own (template
    ``extra:<template>``, or ``extra`` without one) under the same rule: when neither the main
    data nor the extra data has templates, every training problem is used."""
    per = base_train["per_template"]
    if all(is_untemplated(t) for t in per):
        weak, chosen = [], list(train)
    else:
        weak = sorted(t for t, v in per.items() if v["accuracy"] < threshold)
        chosen = [p for p in train if p.template in set(weak)]
    return _subset(chosen, limit, seed), weak


def find_pivots(model, tokenizer, pairs: Sequence[TracePair], method: str, branching: str,
                gen: GenerationConfig, path: Path | None, progress: bool = True,
                prefix_cache: PrefixCache | None = None, dist: Dist | None = None) -> tuple[list[PivotExample], dict]:
    """Stage 1b over flipped pairs, appending one line per pair to ``path`` (resumable).
    Returns the examples and totals of what the search cost. ``prefix_cache`` is emptied before
    every pair (:func:`~cca_fast.generation.prefix.start_unit`).

    ``dist``: the pairs are shared out across its ranks (:func:`cca_fast.distributed.sharded`);
    every rank returns the same, and only rank 0 writes ``path``, in one process's order."""
    from tqdm.auto import tqdm

    from cca_fast.stages.pivots.search import pivot_for_pair

    dist = dist or Dist()
    done: dict[str, dict[str, Any]] = {}
    if path is not None and path.exists():
        done = {r["problem_id"]: r for r in read_jsonl(path)}
    flipped = [p for p in pairs if p.flipped]
    todo = [p for p in flipped if p.problem_id not in done]

    def search(pair: TracePair) -> dict[str, Any]:
        start_unit(prefix_cache)
        example, stats = pivot_for_pair(model, tokenizer, pair, method, branching, gen, prefix_cache=prefix_cache)
        return {"problem_id": pair.problem_id, "example": example.to_dict() if example else None,
                "stats": asdict(stats)}

    bar = tqdm(total=len(todo), desc=f"stage 1: pivots ({method})", disable=not (progress and dist.main))
    try:
        for pair, rec in sharded(dist, todo, search):
            done[pair.problem_id] = rec
            if path is not None and dist.main:
                append_jsonl(path, rec)
            bar.update(1)
    finally:
        bar.close()
    return pivot_totals(flipped, done)


def pivot_totals(flipped: Sequence[TracePair], done: dict[str, dict[str, Any]]) -> tuple[list[PivotExample], dict]:
    """The examples of the flipped pairs' ``pivots.jsonl`` records ``done`` (by problem id), and
    totals of what the search cost."""
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
    from cca_fast.stages.localize.dcm import run_dcm
    from cca_fast.stages.localize.select import select

    sel = config.selector
    if sel == "dcm":
        result = run_dcm(model, examples, procedure_settings(config).dcm, progress=progress,
                         space=space)
        selection = select("dcm", space, mask=result.mask, threshold=result.config.threshold)
        selection.params.update({"epochs": result.epochs, "stopped_early": result.stopped_early})
        return selection
    if sel in ("atp-topk", "atp-fraction"):
        scores = run_atp(model, examples, AtPConfig(batch_size=config.generation.batch_size), progress=progress, space=space)
        return select(sel, space, scores=scores, k=config.select_k, fraction=config.select_fraction)
    if sel == "random":
        if config.select_kinds:  # as many of each kind (and so as many parameters) as another selection
            return select("random", space, like=dict(config.select_kinds), seed=config.seed)
        count = config.select_count or max(1, round(config.select_fraction * space.total))
        return select("random", space, like=int(count), seed=config.seed)
    raise CCAError(f"selector {sel!r} selects nothing")


# ---- the run -------------------------------------------------------------------------------------
def run_cca(config: RunConfig, *, until: str | None = None, progress: bool = True) -> RunReport | None:
    """Run (or resume) every stage of CCA; returns the :class:`RunReport` (``None`` when stopped
    by ``until``, and on every rank but 0 under ``torchrun``).

    Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is started here
    (:func:`cca_fast.distributed.init_from_env`; the caller may destroy it with
    :func:`cca_fast.distributed.shutdown`). Rank 0 makes every check and holds the run
    directory's lock, then tells the other ranks to go on (or why not); every rank loads the
    model (each on its own GPU when there are GPUs) and stage 1's generation is shared out across
    the ranks, rank 0 writing every file (see :mod:`cca_fast.experiments.stages`). The other ranks
    return after stage 1; rank 0 runs the rest.

    Args:
        config: the run's :class:`RunConfig`; ``config.output`` is the run directory. Checked
            (:meth:`RunConfig.validate`) before anything is written or loaded.
        until: stop after this stage (one of :data:`STAGE_NAMES`).

    Raises:
        CCAError: a bad configuration, an empty split, a run directory in use by another
            process, or a resumed run whose configuration or weights changed (on rank 0; the
            other ranks raise a CCAError that names rank 0's).
    """
    from cca_fast.distributed import init_from_env

    config.validate()
    if until is not None and until not in STAGE_NAMES:
        raise CCAError(f"unknown stage {until!r} (--until); stages: {', '.join(STAGE_NAMES)}")
    dist = init_from_env()
    if dist.main:
        return _run_main(config, until, progress, dist)
    return _run_follower(config, until, progress, dist)


def _run_main(config: RunConfig, until: str | None, progress: bool, dist: Dist) -> RunReport | None:
    """:func:`run_cca` on rank 0 (the only rank outside ``torchrun``): the checks, the lock, the
    writes, every stage."""
    import time

    from cca_fast.distributed import rank_device
    from cca_fast.io import check_writable_dir
    from cca_fast.models.identity import model_identity
    from cca_fast.models.loading import load_model

    # every check comes before config.json is written: a refused command leaves nothing behind
    # that would refuse the corrected one (values, the files the run reads, the folder, the splits)
    announced = False  # whether the other ranks were told to go on
    try:
        config.check_inputs()
        check_writable_dir(config.output, "--output")
        rd = RunDir(config.output, create=False)
        # a new run's splits are made and checked now; an older run's are read and checked (cheap)
        pending = None if all(rd.split(s).exists() for s in _stages.SPLITS) else _stages.make_splits(config)
        if pending is None:
            _stages.check_splits(*(rd.read_split(s) for s in _stages.SPLITS), config)
        rd = RunDir(config.output)
        with rd.lock():
            rd.check_config(config, write=False)  # another configuration: refused before the load
            rd.check_model_identity(model_identity(config.model))
            if until == _stages.STAGES[0].name:  # the data stage needs no model (and no other rank)
                dist.broadcast_object(None)
                announced = True
                rd.check_config(config)
                run_stages(_stages.STAGES[:1], RunContext(config, rd, progress, pending_splits=pending))
                return None
            t = time.perf_counter()
            model, tok = load_model(config.model, dtype=config.dtype, device=rank_device(config.device),
                                    attn_implementation=config.attn_implementation)
            space = ComponentSpace(model)
            config.check_model_size(space.total)
            rd.check_config(config)
            # checked, config.json written: the other ranks load the model and follow
            dist.broadcast_object(None)
            announced = True
            # the exemplars' key/values, computed once per weights (unused by the reference procedure,
            # which shares no prefix); every stage passes it to its generation calls
            ctx = RunContext(config, rd, progress, model=model, tokenizer=tok, space=space,
                             prefix_cache=PrefixCache(), pending_splits=pending, dist=dist)
            rd.record_seconds("load_model", time.perf_counter() - t)
            return run_stages(_stages.STAGES, ctx, until=until)
    except Exception as e:
        if not announced:  # the other ranks stop too, naming the reason
            dist.broadcast_object(str(e) if isinstance(e, CCAError) else f"{type(e).__name__}: {e}")
        raise


def _run_follower(config: RunConfig, until: str | None, progress: bool, dist: Dist) -> None:
    """:func:`run_cca` on a rank other than 0: wait for rank 0's checks, load the model on this
    rank's device, compute this rank's share of stage 1 (writing nothing) and return ``None``."""
    from cca_fast.distributed import rank_device
    from cca_fast.models.loading import load_model

    refused = dist.broadcast_object()
    if refused is not None:
        raise CCAError(f"rank 0 refused the run: {refused}")
    if until == _stages.STAGES[0].name:
        return None
    model, tok = load_model(config.model, dtype=config.dtype, device=rank_device(config.device),
                            attn_implementation=config.attn_implementation)
    ctx = RunContext(config, RunDir(config.output, create=False), progress, model=model, tokenizer=tok,
                     space=ComponentSpace(model), prefix_cache=PrefixCache(), dist=dist)
    run_stages(_stages.STAGES, ctx, until=until)
    return None
