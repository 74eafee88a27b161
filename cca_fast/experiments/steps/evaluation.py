"""Greedy evaluation in the run: resumable evaluation of splits (:func:`eval_parts`, one split:
:func:`eval_resumable`), the
``base_eval`` step (the base model on the training and test splits) and the ``cca_eval`` step
(the updated model on the test split)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cca_fast.data.problem import Problem
from cca_fast.distributed import Dist, sharded
from cca_fast.evaluation.prompting import PromptConfig, build_prompt, encode_prompts
from cca_fast.experiments.rundir import RunDir
from cca_fast.experiments.steps.data import Splits
from cca_fast.experiments.steps.loop import LATER_STAGE_FIELDS, PIVOT_CHOICE_FIELDS, RunContext, read_records
from cca_fast.generation.decode import GenerationConfig, generate
from cca_fast.generation.prefix import PrefixCache, shared_len, start_unit
from cca_fast.io import append_jsonl, read_jsonl


#: an evaluation's chunk (one generation call: a unit of resumption and of sharding across ranks)
#: holds about this many times the sequences decoded at once. Each call ends with a tail of rows
#: draining its slots at a few rows a step, so fewer, larger chunks cost less: measured on the
#: default run's base evaluation (238 problems, 2-core CPU, same tokens, paired runs), the training
#: and test splits as one chunk of 238 vs one chunk each (136 + 102) at 64 slots: 69.9-70.4 s vs
#: 70.7-72.7 s (1.01-1.03x); at 128 slots, one chunk: 65.9-67.8 s (1.07x). A kill loses at most
#: one chunk's generations.
CHUNK_ROWS = 4


@dataclass
class EvalPart:
    """One split of an evaluation: its problems, the JSON Lines file its records are appended to
    (``None``: records are only returned), the progress label, whether records keep token ids."""

    problems: Sequence[Problem]
    path: Path | None
    desc: str
    keep_ids: bool = True


def eval_resumable(model, tokenizer, problems: Sequence[Problem], prompt: PromptConfig, gen: GenerationConfig,
                   path: Path | None, desc: str, progress: bool = True, keep_ids: bool = True,
                   prefix_cache: PrefixCache | None = None, dist: Dist | None = None) -> list[dict[str, Any]]:
    """Greedy evaluation records of ``problems`` (aligned), appending each finished chunk to the
    JSON Lines file ``path`` so that an interrupted evaluation resumes. Records carry
    ``prompt_ids`` and ``output_ids`` when ``keep_ids``. One split of :func:`eval_parts`, which
    documents ``prefix_cache`` and ``dist``."""
    return eval_parts(model, tokenizer, [EvalPart(problems, path, desc, keep_ids)], prompt, gen, progress=progress,
                      prefix_cache=prefix_cache, dist=dist)[0]


def eval_parts(model, tokenizer, parts: Sequence[EvalPart], prompt: PromptConfig, gen: GenerationConfig, *,
               progress: bool = True, prefix_cache: PrefixCache | None = None,
               dist: Dist | None = None) -> list[list[dict[str, Any]]]:
    """Greedy evaluation records of every part's problems (one list per part, aligned with its
    problems), the parts' unwritten problems decoded together: one sequence of chunks over all of
    them (about :data:`CHUNK_ROWS` ``* gen.rows`` problems each, :func:`balanced_chunks`), so that
    two splits share one generation call and its tail instead of a tail each. Each finished
    chunk's records are appended to their part's file (input order), and problems already in a
    file are not recomputed.

    ``prefix_cache``: see :func:`~cca_fast.generation.decode.generate`; the exemplars are pinned
    (computed once per weights for every chunk) and the rest is emptied before every chunk
    (:func:`~cca_fast.generation.prefix.start_unit`), so a chunk's numbers do not depend on the
    chunks before it. ``dist``: the chunks are shared out across its ranks
    (:func:`cca_fast.distributed.sharded`); every rank returns every record and only rank 0
    writes the files, in the order one process writes them."""
    from tqdm.auto import tqdm

    from cca_fast.evaluation.evaluate import score

    dist = dist or Dist()
    done: list[dict[str, dict[str, Any]]] = []
    for part in parts:
        done.append({r["id"]: r for r in read_jsonl(part.path)} if part.path is not None and part.path.exists() else {})
    todo = [(k, p) for k, part in enumerate(parts) for p in part.problems if p.id not in done[k]]
    desc = " + ".join(part.desc for part in parts)
    check_prompts_fit(model, tokenizer, [p for _, p in todo], prompt, gen, desc)
    if prefix_cache is not None and gen.share_prefix:  # the exemplars: once per weights, the same for every chunk
        every = encode_prompts([build_prompt(p.question, prompt, tokenizer) for part in parts for p in part.problems],
                               tokenizer, prompt)
        if every:
            prefix_cache.pin(every[0][:shared_len(every, gen.min_shared_prefix)])
    chunks = balanced_chunks(todo, max(1, gen.rows) * CHUNK_ROWS)

    def evaluate(chunk: list[tuple[int, Problem]]) -> list[dict[str, Any]]:
        start_unit(prefix_cache)
        problems = [p for _, p in chunk]
        ids = encode_prompts([build_prompt(p.question, prompt, tokenizer) for p in problems], tokenizer, prompt)
        gens = generate(model, tokenizer, ids, gen, prefix_cache=prefix_cache)
        records, _, _, _ = score(problems, gens)
        for (k, _), r, g in zip(chunk, records, gens):
            if parts[k].keep_ids:
                r["prompt_ids"], r["output_ids"] = list(g.prompt_ids), list(g.output_ids)
        return records

    total = sum(len(part.problems) for part in parts)
    bar = tqdm(total=total, initial=total - len(todo), desc=desc, unit="problem",
               disable=not (progress and dist.main))
    try:
        for chunk, records in sharded(dist, chunks, evaluate):
            for (k, _), r in zip(chunk, records):
                done[k][r["id"]] = r
                if parts[k].path is not None and dist.main:
                    append_jsonl(parts[k].path, r)
            bar.update(len(chunk))
    finally:
        bar.close()
    return [[done[k][p.id] for p in part.problems] for k, part in enumerate(parts)]


def balanced_chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    """``items`` cut into ``round(len / size)`` (at least one) consecutive chunks of near-equal
    length, in order: between ``size / 2`` and ``1.5 * size`` items each (fewer only when there
    are fewer items). A remainder does not make a small chunk of its own: each chunk ends with a
    tail of rows draining the slots, and a chunk of a few problems decodes at a few rows a step
    (measured on the default run's base evaluation, 2-core CPU, 64 slots: 136 training problems
    as 128 + 8 vs as one chunk, 73.3 s vs 69.8 s for the 238 problems, the same tokens). Results do
    not depend on the chunks (every sequence computes what it computes alone)."""
    if not items:
        return []
    n = max(1, round(len(items) / max(1, size)))
    cut = [len(items) * i // n for i in range(n + 1)]
    return [list(items[a:b]) for a, b in zip(cut, cut[1:])]


def check_prompts_fit(model, tokenizer, problems: Sequence[Problem], prompt: PromptConfig, gen: GenerationConfig,
                      where: str) -> None:
    """Refuse, before any generation, problems whose prompt plus ``gen.max_new_tokens`` exceeds
    the model's context or whose batch cannot fit in memory
    (:func:`cca_fast.models.lengths.check_generation_fits`; tokenizes the prompts, no model call)."""
    from cca_fast.models.lengths import check_generation_fits

    if not problems:
        return
    ids = encode_prompts([build_prompt(p.question, prompt, tokenizer) for p in problems], tokenizer, prompt)
    check_generation_fits(model, [len(x) for x in ids], gen.max_new_tokens, gen.batch_size,
                          names=[f"problem {p.id}" for p in problems], where=where)


def base_eval_records(model, tokenizer, train: Sequence[Problem], test: Sequence[Problem], prompt: PromptConfig,
                      gen: GenerationConfig, train_path: Path | None, test_path: Path | None, progress: bool = True, *,
                      prefix_cache: PrefixCache | None = None,
                      dist: Dist | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ``base_eval`` stage's records: the training split (with token ids) and the test split,
    decoded together (:func:`eval_parts`)."""
    got = eval_parts(model, tokenizer, [EvalPart(train, train_path, "base eval (train)"),
                                        EvalPart(test, test_path, "base eval (test)", keep_ids=False)],
                     prompt, gen, progress=progress, prefix_cache=prefix_cache, dist=dist)
    return got[0], got[1]


@dataclass
class BaseEval:
    """The base model's greedy records of the training split and the test summary."""

    train_records: list[dict[str, Any]]
    train: dict[str, Any]
    test: dict[str, Any]

    def message(self) -> str:
        return f"base accuracy: train {self.train['accuracy']:.3f}, test {self.test['accuracy']:.3f}"


@dataclass
class CCAEval:
    """The updated model on the test problems."""

    test: dict[str, Any]


class BaseEvalStep:
    """Greedy traces of the training split (kept with token ids) and the base test accuracy."""

    name = "base_eval"
    outputs = (RunDir.BASE_TRAIN, RunDir.BASE_TEST)
    all_ranks = True
    ignores = LATER_STAGE_FIELDS + PIVOT_CHOICE_FIELDS  # stage 1 (a study shares it between conditions)

    def load(self, ctx: RunContext) -> BaseEval | None:
        from cca_fast.evaluation.evaluate import summarize

        splits: Splits = ctx.results["data"]
        train = read_records(ctx.rd.base_train, splits.train)
        test = read_records(ctx.rd.base_test, splits.test)
        if train is None or test is None:
            return None
        return BaseEval(train, summarize(train), summarize(test))

    def run(self, ctx: RunContext) -> BaseEval:
        from cca_fast.evaluation.evaluate import summarize

        splits: Splits = ctx.results["data"]
        c, gen = ctx.config, ctx.settings.generation
        # every split at once (validation too: stage 3 evaluates it), before the first generation
        check_prompts_fit(ctx.model, ctx.tokenizer, [*splits.train, *splits.val, *splits.test], c.prompt, gen,
                          "the run's problems")
        train, test = base_eval_records(ctx.model, ctx.tokenizer, splits.train, splits.test, c.prompt, gen,
                                        ctx.rd.base_train, ctx.rd.base_test, ctx.progress,
                                        prefix_cache=ctx.prefix_cache, dist=ctx.dist)
        return BaseEval(train, summarize(train), summarize(test))


class CCAEvalStep:
    """The updated model (base + the saved delta) on the test problems."""

    name = "cca_eval"
    outputs = (RunDir.CCA_TEST,)
    all_ranks = False
    ignores: tuple[str, ...] = ()

    def load(self, ctx: RunContext) -> CCAEval | None:
        from cca_fast.evaluation.evaluate import summarize

        records = read_records(ctx.rd.cca_test, ctx.results["data"].test)
        return None if records is None else CCAEval(summarize(records))

    def run(self, ctx: RunContext) -> CCAEval:
        from cca_fast.delta import SparseDelta, apply_delta
        from cca_fast.evaluation.evaluate import summarize

        if not ctx.model_holds_update:
            apply_delta(ctx.model, SparseDelta.load(ctx.rd.delta))
            ctx.model_holds_update = True
        records = eval_resumable(ctx.model, ctx.tokenizer, ctx.results["data"].test, ctx.config.prompt,
                                 ctx.settings.generation, ctx.rd.cca_test, "CCA eval (test)", ctx.progress,
                                 keep_ids=False)
        test_loglik(ctx)
        return CCAEval(summarize(records))


def test_loglik(ctx: RunContext) -> None:
    """``loglik_test.json``: the test problems' gold-solution log-likelihoods under the updated
    model (``ctx.model`` holds the update) and the base (the delta reverted, then applied again);
    nothing when a problem has no solution text. A continuous, paired metric beside accuracy
    (:mod:`cca_fast.evaluation.gold_loglik`)."""
    from cca_fast.delta import SparseDelta, apply_delta, revert_delta
    from cca_fast.errors import DataError
    from cca_fast.io import atomic_write_json
    from cca_fast.evaluation.gold_loglik import gold_loglik_examples
    from cca_fast.stages.sft import build_sft_examples

    test = ctx.results["data"].test
    if ctx.rd.loglik_test.exists() or not test:
        return
    try:
        examples = build_sft_examples(test, ctx.tokenizer, ctx.config.prompt)
    except DataError:
        return
    bs, tpl = ctx.settings.generation.batch_size, [p.template for p in test]
    cca = gold_loglik_examples(ctx.model, examples, batch_size=bs, templates=tpl)
    delta = SparseDelta.load(ctx.rd.delta)
    if delta.meta.get("kept_base") or not delta.params:
        base = cca  # the base weights were kept
    elif all(pd.base is not None for pd in delta.params.values()):
        revert_delta(ctx.model, delta)
        base = gold_loglik_examples(ctx.model, examples, batch_size=bs, templates=tpl)
        apply_delta(ctx.model, delta)
    else:  # the no-mask delta holds no base rows: the base is not in memory any more
        base = None
    atomic_write_json(ctx.rd.loglik_test, {"base": None if base is None else [r.to_dict() for r in base],
                                           "cca": [r.to_dict() for r in cca]})
