"""Stage 3 in the run: the ``update`` step (gradient descent on the selected rows, the best step by
validation accuracy, the delta saved), its validation problems and gold-solution examples."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from cca_fast.data.problem import Problem
from cca_fast.errors import CCAError
from cca_fast.experiments.config import RunConfig
from cca_fast.experiments.rundir import RunDir
from cca_fast.experiments.steps.data import Splits
from cca_fast.experiments.steps.evaluation import eval_resumable
from cca_fast.experiments.steps.loop import RunContext
from cca_fast.io import atomic_write_json, read_json


@dataclass
class UpdateInfo:
    """Stage 3: ``update.json`` (the delta itself is in ``delta/``)."""

    best_step: int
    best_val: float | None
    history: list[dict[str, Any]]
    config: dict[str, Any]

    def message(self) -> str:
        return f"stage 3: best step {self.best_step} (validation accuracy {self.best_val})"


def gold_examples(ctx: RunContext) -> list | None:
    """The gold-solution examples of stage 1's training problems (``None`` when a problem has no
    solution text, e.g. a template without one)."""
    from cca_fast.stages.sft import build_sft_examples
    from cca_fast.errors import DataError

    try:
        return build_sft_examples(ctx.results["traces"].problems, ctx.tokenizer, ctx.config.prompt)
    except DataError:
        return None


def validation_problems(config: RunConfig, splits: "Splits", training_ids: Sequence[str]) -> list[Problem]:
    """The problems every update step (and the LoRA baseline's epochs) is selected on: the
    validation split plus ``val_from_train`` training-split problems stage 1 did not use (a
    seeded draw; never extra training problems, ``RunConfig.extra_train_data``), so that one
    problem moves validation accuracy less."""
    if not config.val_from_train:
        return list(splits.val)
    import random

    from cca_fast.data.splits import is_extra

    used = set(training_ids)
    unused = [p for p in splits.train if p.id not in used and not is_extra(p)]
    extra = random.Random(f"val_from_train:{config.seed}").sample(unused, min(config.val_from_train, len(unused)))
    return list(splits.val) + sorted(extra, key=lambda p: p.id)


def validation_gold(problems: Sequence[Problem], tokenizer, config: RunConfig) -> list | None:
    """The validation problems' gold-solution examples (the step's tie-break), ``None`` when a
    problem has no solution text."""
    from cca_fast.errors import DataError
    from cca_fast.stages.sft import build_sft_examples

    try:
        return build_sft_examples(problems, tokenizer, config.prompt) if problems else None
    except DataError:
        return None


class UpdateStep:
    """Stage 3: gradient descent on the selected rows (every weight for the no-mask baseline),
    the best step by validation accuracy (ties broken by the validation gold-solution
    log-likelihood); the delta is saved and the model reverted to the base
    (the no-mask delta holds no base rows: the model then keeps the update)."""

    name = "update"
    outputs = (RunDir.UPDATE, RunDir.DELTA)
    all_ranks = False
    ignores: tuple[str, ...] = ()

    def load(self, ctx: RunContext) -> UpdateInfo | None:
        return UpdateInfo(**read_json(ctx.rd.update)) if ctx.rd.update.exists() else None

    def run(self, ctx: RunContext) -> UpdateInfo:
        import dataclasses

        from cca_fast.delta import revert_delta
        from cca_fast.evaluation.evaluate import summarize
        from cca_fast.stages.update import run_update

        selection = ctx.results["localize"].selection
        c, s, tok = ctx.config, ctx.settings, ctx.tokenizer
        val = validation_problems(c, ctx.results["data"], [p.id for p in ctx.results["traces"].problems])
        # the no-mask baseline changes every row: its delta is a full model, so no base copy in it
        ucfg = s.update if selection is not None else dataclasses.replace(s.update, scope="all", store_base_rows=False)

        val_gold = validation_gold(val, tok, c)

        def validate(m):
            recs = eval_resumable(m, tok, val, c.prompt, s.generation, None, "validation", False, keep_ids=False,
                                  prefix_cache=ctx.prefix_cache)
            if val_gold is None:
                return summarize(recs)["accuracy"]
            from cca_fast.evaluation.gold_loglik import gold_loglik_examples, summarize_loglik

            # where accuracy cannot decide (equal on every step), the gold log-likelihood does
            ll = summarize_loglik(gold_loglik_examples(m, val_gold, batch_size=s.generation.batch_size))
            return summarize(recs)["accuracy"], ll["mean_logprob"]

        gold = gold_examples(ctx) if ucfg.objective == "gold_nll" else None
        if ucfg.objective == "gold_nll" and not gold:
            raise CCAError("objective gold_nll needs gold solutions of the training problems, and this data has "
                           "none (a template without a solution?): use a pivot objective")
        result = run_update(ctx.model, ctx.space, selection.indices if selection is not None else [],
                            ctx.results["examples"].examples, ucfg, validate=validate, progress=ctx.progress,
                            gold=gold)
        result.delta.meta.update({"selection": selection.to_dict() if selection is not None else None,
                                  "run_config": c.to_dict()})
        result.delta.save(ctx.rd.delta, overwrite=True)  # stage 3 redone: its own delta
        if selection is not None:
            revert_delta(ctx.model, result.delta)  # back to the base: the cca_eval step applies the saved delta
        else:
            ctx.model_holds_update = True
        info = {"best_step": result.best_step, "best_val": result.best_val, "history": result.history,
                "config": result.config}
        atomic_write_json(ctx.rd.update, info)
        return UpdateInfo(**read_json(ctx.rd.update))
