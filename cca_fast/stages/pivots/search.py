"""Stage 1b on a real model: wires :mod:`cca_fast.stages.pivots.algorithms` (model-free algorithms) to generation.

A *trace* is the list of generated token ids after the prompt. Correctness of a trace is judged
exactly as in evaluation: decode, cut at a new ``Q:``, the paper's answer extraction, exact match.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch

from cca_fast.stages.examples import PivotExample
from cca_fast.generation.decode import GenerationConfig, generate
from cca_fast.generation.prefix import PrefixCache
from cca_fast.stages.pivots.algorithms import (PivotStats, branching_pivot_fast, branching_pivot_reference, prefix_pivot,
                     teacher_forced_argmax, to_example)
from cca_fast.evaluation.prompting import NEW_QUESTION_MARKER, extract_answer, find_answer_end, is_correct
from cca_fast.stages.traces import TracePair
from cca_fast.models import runtime


class TraceJudge:
    """Correctness and stop state of traces of one problem."""

    def __init__(self, tokenizer: Any, gold: float, marker: str, eos: set[int] | None = None):
        self.tokenizer = tokenizer
        self.gold = gold
        self.marker = marker
        self.eos = set(eos) if eos is not None else runtime.eos_ids(None, tokenizer)

    def text(self, trace: Sequence[int]) -> str:
        text = self.tokenizer.decode(list(trace), skip_special_tokens=True)
        cut = text.find(self.marker)
        return text if cut < 0 else text[:cut]

    def correct(self, trace: Sequence[int]) -> bool:
        return is_correct(extract_answer(self.text(trace)), self.gold)

    def finished(self, trace: Sequence[int]) -> bool:
        """True if the trace already meets a stop condition (no completion needed)."""
        if trace and int(trace[-1]) in self.eos:
            return True
        text = self.tokenizer.decode(list(trace), skip_special_tokens=True)
        return find_answer_end(text) is not None or self.marker in text


def make_completer(model, tokenizer, prompt_ids: Sequence[int], judge: TraceJudge, gen: GenerationConfig,
                   batched: bool, prefix_cache: PrefixCache | None = None):
    """``complete(prefixes) -> full traces``: greedy continuation of each trace prefix.

    ``batched=False`` is the reference: one sequence at a time, no shared-prefix reuse.
    ``prefix_cache`` (batched only): the prefixes' common part comes from it (e.g. the
    teacher-forced pass over ``prompt + sample`` left it there).
    """
    greedy = replace(gen, do_sample=False, share_prefix=batched, batch_size=gen.batch_size if batched else 1)
    # a completed trace is capped at the length of any trace (max_new_tokens in all, not beyond
    # its prefix): then a prefix that follows the greedy argmax has exactly the completion of the
    # next shorter prefix, which is what makes the pruned search equal to the literal loop
    cap = gen.max_new_tokens

    def complete(prefixes: list[list[int]]) -> list[list[int]]:
        out: list[list[int] | None] = [p if len(p) >= cap or judge.finished(p) else None for p in prefixes]
        todo = [i for i, o in enumerate(out) if o is None]
        groups = [todo] if batched else [[i] for i in todo]
        for group in groups:
            if not group:
                continue
            budget = cap - min(len(prefixes[i]) for i in group)
            gens = generate(model, tokenizer, [list(prompt_ids) + prefixes[i] for i in group],
                            replace(greedy, max_new_tokens=budget), prefix_cache=prefix_cache if batched else None)
            for i, g in zip(group, gens):
                out[i] = prefixes[i] + list(g.output_ids)[: cap - len(prefixes[i])]
        return out  # type: ignore[return-value]

    return complete


@torch.no_grad()
def greedy_next_token(model, prompt_ids: Sequence[int], prefix: Sequence[int]) -> int:
    """The model's argmax next token after ``prompt + prefix`` (one forward pass)."""
    device = runtime.input_device(model)
    ids = torch.tensor([list(prompt_ids) + list(prefix)], dtype=torch.long, device=device)
    return int(model(input_ids=ids).logits[0, -1].argmax())


def pivot_for_pair(model, tokenizer, pair: TracePair, method: str, branching: str, gen: GenerationConfig,
                   *, marker: str | None = None,
                   prefix_cache: PrefixCache | None = None) -> tuple[PivotExample | None, PivotStats]:
    """The pivot example of a flipped trace pair (``None`` if the traces never diverge usefully).

    Args:
        method: ``"prefix"`` or ``"branching"``.
        branching: ``"fast"`` (pruned, batched) or ``"reference"`` (the literal per-position loop).
        prefix_cache: ``"fast"`` only: one :class:`~cca_fast.generation.prefix.PrefixCache` for all the
            pairs of a run (same weights): the few-shot exemplars are computed once, and each
            pair's completions continue the key/values of its teacher-forced pass.
    """
    if not pair.flipped:
        raise ValueError(f"problem {pair.problem_id} has no flipped sample")
    judge = TraceJudge(tokenizer, pair.gold, marker or NEW_QUESTION_MARKER,
                       runtime.eos_ids(model, tokenizer, gen.eos_token_ids))
    if method == "prefix":
        pivot = prefix_pivot(pair.greedy_ids, pair.sample_ids, pair.greedy_correct)
        stats = PivotStats()
    elif method == "branching":
        fast = branching == "fast"
        cache = prefix_cache if fast and gen.share_prefix else None
        complete = make_completer(model, tokenizer, pair.prompt_ids, judge, gen, batched=fast, prefix_cache=cache)
        if fast:
            pivot, stats = branching_pivot_fast(
                pair.sample_ids, pair.greedy_correct, complete, judge.correct,
                lambda s: teacher_forced_argmax(model, pair.prompt_ids, s, cache), batch_size=gen.batch_size)
        else:
            pivot, stats = branching_pivot_reference(
                pair.sample_ids, pair.greedy_correct, complete, judge.correct,
                lambda prefix: greedy_next_token(model, pair.prompt_ids, prefix))
    else:
        raise ValueError(f"unknown pivot method {method!r}")
    if pivot is None or pivot.desired == pivot.undesired:
        return None, stats
    return to_example(pivot, pair.prompt_ids, pair.problem_id, greedy_correct=pair.greedy_correct,
                      method=method if method == "prefix" else f"branching-{branching}"), stats


def compare_branching(model, tokenizer, pairs: Sequence[TracePair], gen: GenerationConfig,
                      reference_gen: GenerationConfig | None = None) -> dict[str, Any]:
    """Run the reference loop and the fast search on every flipped pair; report whether the
    pivots are identical, and what each cost (completions, generated tokens, seconds).
    ``reference_gen``: the literal loop's generation settings (default ``gen``; the authors'
    procedure decodes ``max_new_tokens`` every time: ``replace(gen, early_stop=False)``)."""
    import time

    rows = []
    cache = PrefixCache()  # the fast side's, across pairs, as in a run
    for pair in pairs:
        out = {}
        for impl in ("reference", "fast"):
            t = time.perf_counter()
            fast = impl == "fast"
            example, stats = pivot_for_pair(model, tokenizer, pair, "branching", impl,
                                            gen if fast or reference_gen is None else reference_gen,
                                            prefix_cache=cache if fast else None)
            out[impl] = {"seconds": time.perf_counter() - t, "completions": stats.completions,
                         "generated_tokens": stats.generated_tokens,
                         "pivot": None if example is None else
                         {"t": example.meta["t"], "desired": example.desired, "undesired": example.undesired,
                          "prefix_len": len(example.prefix_ids)}}
        rows.append({"problem_id": pair.problem_id, "greedy_correct": pair.greedy_correct,
                     "sample_len": len(pair.sample_ids), "same_pivot": out["reference"]["pivot"] == out["fast"]["pivot"],
                     **out})
    tot = {impl: {k: sum(r[impl][k] for r in rows) for k in ("seconds", "completions", "generated_tokens")}
           for impl in ("reference", "fast")}
    return {
        "pairs": len(rows),
        "identical": all(r["same_pivot"] for r in rows),
        "totals": tot,
        "token_ratio": tot["reference"]["generated_tokens"] / max(1, tot["fast"]["generated_tokens"]),
        "time_ratio": tot["reference"]["seconds"] / max(1e-9, tot["fast"]["seconds"]),
        "rows": rows,
    }
