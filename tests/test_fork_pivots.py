"""Greedy-path forking pivots: the batched search (one teacher-forced pass, batched completions
through a PrefixCache) equals a literal reference (a separate forward per prefix, a token-by-token
greedy completion of each candidate); a constructed flip gives the right example in both
directions; no candidate means no completion; a bad config is refused."""
from __future__ import annotations

import pytest
import torch

import cca_fast.stages.pivots.fork as fork
from cca_fast.data.problem import Problem
from cca_fast.errors import CCAError
from cca_fast.evaluation.prompting import extract_answer
from cca_fast.generation.decode import GenerationConfig, generate
from cca_fast.generation.prefix import PrefixCache
from cca_fast.models import runtime
from cca_fast.stages.pivots.fork import ForkConfig, fork_pivots, fork_pivots_for
from cca_fast.stages.pivots.search import TraceJudge
from helpers import char_tokenizer, make_biased_tiny

# float64 model: the one teacher-forced pass (with or without reused prefix positions) and a
# separate forward per prefix differ only in reduction order, ~1e-15 on probabilities; 1e-9 is far
# above that and far below any real error (a wrong row or token changes a probability by >1e-3)
ATOL = 1e-9

SHOT = "Q: 1+0?\nA: 1.\n"  # a common head, so the prefix cache has something to reuse
QUESTIONS = ["Q: 3+4?\nA:", "Q: what is 1?\nA:", "Q: 12 - 11?\nA:", "Q: x\nA: "]
GEN = GenerationConfig(max_new_tokens=14, batch_size=3, min_shared_prefix=4)


@pytest.fixture(scope="module")
def setup():
    tok = char_tokenizer()
    model = make_biased_tiny(tok).double()
    prompts = [tok(SHOT + q)["input_ids"] for q in QUESTIONS]
    greedy = [g.output_ids for g in generate(model, tok, prompts, GEN)]
    return tok, model, prompts, greedy


# ---------------------------------------------------------------- the literal reference

@torch.no_grad()
def _next_probs(model, ids: list[int]) -> torch.Tensor:
    """Next-token probabilities ``[V]`` after ``ids`` (one forward of that prefix alone)."""
    return torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], dim=-1)


def _literal_complete(model, judge: TraceJudge, prompt: list[int], prefix: list[int], cap: int) -> list[int]:
    """Greedy continuation, one token and one full forward at a time: nothing to do for a prefix
    that is finished or at the cap; stop after an EOS token or at ``cap`` trace tokens."""
    s = list(prefix)
    if len(s) >= cap or judge.finished(s):
        return s
    while len(s) < cap:
        s.append(int(_next_probs(model, prompt + s).argmax()))
        if s[-1] in judge.eos:
            break
    return s


def _reference(model, tok, pid, gold, prompt, greedy, greedy_correct, gen, config):
    judge = TraceJudge(tok, gold, "\nQ:", runtime.eos_ids(model, tok, gen.eos_token_ids))
    cands = []
    for t in range(len(greedy)):
        p = _next_probs(model, prompt + greedy[:t])
        others = [(float(p[v]), v) for v in range(p.shape[0]) if v != greedy[t]]
        p_alt = max(q for q, _ in others)
        alt = min(v for q, v in others if q == p_alt)
        if p_alt >= config.p_min:
            cands.append((t, alt, p_alt, float(p[greedy[t]])))
    cands = sorted(cands, key=lambda c: (-c[2], c[0]))[: config.max_forks]
    out = []
    for t, alt, p_alt, p_greedy in sorted(cands):
        full = _literal_complete(model, judge, prompt, greedy[:t] + [alt], gen.max_new_tokens)
        if judge.correct(full) != greedy_correct:
            d, u = (greedy[t], alt) if greedy_correct else (alt, greedy[t])
            out.append(dict(problem_id=pid, prefix_ids=list(prompt + greedy[:t]), desired=d, undesired=u,
                            direction="greedy_correct" if greedy_correct else "greedy_wrong", method="greedy_fork",
                            t=t, p_alt=p_alt, p_greedy=p_greedy))
    return out, {"candidates": len(cands), "completions": len(cands), "flips": len(out)}


def _rows(examples):
    return [dict(problem_id=e.problem_id, prefix_ids=list(e.prefix_ids), desired=e.desired, undesired=e.undesired,
                 direction=e.direction, method=e.method, **e.meta) for e in examples]


def _same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.pop("on_greedy_path") is True and w.pop("on_greedy_path", True) is True
        for k in ("p_alt", "p_greedy"):
            assert g.pop(k) == pytest.approx(w.pop(k), abs=ATOL)
        assert g == w


def test_batched_and_one_at_a_time_equal_the_literal_reference(setup):
    tok, model, prompts, greedy = setup
    config = ForkConfig(p_min=0.05, max_forks=5)  # more candidates than 5 above 0.05: the cut matters
    cache = PrefixCache(min_reuse=8)
    directions = []
    for i, (prompt, g) in enumerate(zip(prompts, greedy)):
        own = extract_answer(tok.decode(g, skip_special_tokens=True))  # a gold that makes the greedy trace right
        for gold in [1.0] + ([own] if own is not None else []):
            judge = TraceJudge(tok, gold, "\nQ:")
            ok = judge.correct(g)
            want, want_stats = _reference(model, tok, f"p{i}", gold, prompt, g, ok, GEN, config)
            for kw in (dict(batched=True, prefix_cache=cache), dict(batched=True), dict(batched=False)):
                got, stats = fork_pivots(model, tok, f"p{i}", gold, prompt, g, ok, GEN, config, **kw)
                assert stats == want_stats
                _same(_rows(got), [dict(w) for w in want])
            directions += [w["direction"] for w in want]
            for w in want:  # the greedy token is the argmax: a greedy_wrong pivot's desired token is not
                assert w["p_greedy"] >= w["p_alt"]
    assert directions.count("greedy_wrong") >= 2 and directions.count("greedy_correct") >= 1
    assert cache.stats.hits >= 8


def test_fork_pivots_for_sums_the_problems(setup):
    tok, model, prompts, greedy = setup
    config = ForkConfig(p_min=0.05, max_forks=3)
    problems = [Problem(f"p{i}", "", "", 1.0) for i in range(len(prompts))]
    records = {p.id: {"prompt_ids": pr, "output_ids": g, "correct": TraceJudge(tok, 1.0, "\nQ:").correct(g)}
               for p, pr, g in zip(problems, prompts, greedy)}
    got, totals = fork_pivots_for(model, tok, problems, records, GEN, config, prefix_cache=PrefixCache())
    want, want_totals = [], {"problems": len(problems), "candidates": 0, "completions": 0, "flips": 0}
    for p in problems:
        r = records[p.id]
        ex, st = fork_pivots(model, tok, p.id, 1.0, r["prompt_ids"], r["output_ids"], r["correct"], GEN, config)
        want += ex
        for k in st:
            want_totals[k] += st[k]
    assert totals == want_totals and want_totals["flips"] >= 1
    _same(_rows(got), _rows(want))
    with pytest.raises(CCAError, match="no greedy trace for problem 'p9'"):
        fork_pivots_for(model, tok, problems + [Problem("p9", "", "", 1.0)], records, GEN, config)


# ---------------------------------------------------------------- a constructed flip

class _PrefixJudge(TraceJudge):
    """Correct iff the trace starts with ``bad`` (``correct_if_prefix=True``) or iff it does not (``False``)."""

    def __init__(self, tok, bad: list[int], correct_if_prefix: bool):
        super().__init__(tok, 0.0, "\nQ:", {2})
        self.bad, self.correct_if_prefix = bad, correct_if_prefix

    def correct(self, trace):
        return (list(trace[: len(self.bad)]) == self.bad) == self.correct_if_prefix


@pytest.mark.parametrize("greedy_correct", [False, True])
def test_a_constructed_flip_gives_the_example(setup, monkeypatch, greedy_correct):
    tok, model, prompts, greedy = setup
    prompt, g = prompts[0], greedy[0]
    config = ForkConfig(p_min=0.02, max_forks=len(g))
    cands = fork.fork_candidates(fork.next_token_probs(model, prompt, g), g, config)
    assert len(cands) >= 3
    c = cands[1]  # the second most probable alternative: not simply the first one tried
    # the completion from greedy[:t] + [alt] is the only one that starts with it: exactly that fork
    # flips (correct while the greedy trace is wrong, or the other way round)
    judge = _PrefixJudge(tok, g[: c.t] + [c.alt], correct_if_prefix=not greedy_correct)
    assert judge.correct(g) == greedy_correct
    monkeypatch.setattr(fork, "TraceJudge", lambda *a, **k: judge)
    got, stats = fork_pivots(model, tok, "p0", 0.0, prompt, g, greedy_correct, GEN, config, prefix_cache=PrefixCache())
    assert stats == {"candidates": len(cands), "completions": len(cands), "flips": 1}
    (e,) = got
    assert e.prefix_ids == tuple(prompt) + tuple(g[: c.t])
    assert (e.desired, e.undesired) == ((g[c.t], c.alt) if greedy_correct else (c.alt, g[c.t]))
    assert e.direction == ("greedy_correct" if greedy_correct else "greedy_wrong")
    assert e.method == "greedy_fork"
    assert e.meta == {"t": c.t, "p_alt": c.p_alt, "p_greedy": c.p_greedy, "on_greedy_path": True}


def test_no_candidate_means_no_completion(setup, monkeypatch):
    tok, model, prompts, greedy = setup

    def no_completion(*a, **k):
        raise AssertionError("a completion was requested without a candidate")

    monkeypatch.setattr(fork, "make_completer", no_completion)
    # the greedy token is the argmax, so every alternative has probability <= 1/2 < 0.51
    for prompt, g in zip(prompts, greedy):
        got, stats = fork_pivots(model, tok, "p", 1.0, prompt, g, False, GEN, ForkConfig(p_min=0.51))
        assert got == [] and stats == {"candidates": 0, "completions": 0, "flips": 0}
    assert fork_pivots(model, tok, "p", 1.0, prompts[0], [], False, GEN, ForkConfig())[1]["completions"] == 0


@pytest.mark.parametrize("kw, field", [(dict(p_min=0.0), "p_min"), (dict(p_min=1.0), "p_min"),
                                       (dict(p_min=-0.2), "p_min"), (dict(p_min=float("nan")), "p_min"),
                                       (dict(p_min="0.1"), "p_min"), (dict(max_forks=0), "max_forks"),
                                       (dict(max_forks=-3), "max_forks"), (dict(max_forks=2.5), "max_forks"),
                                       (dict(max_forks=True), "max_forks")])
def test_bad_config_is_refused(kw, field):
    with pytest.raises(CCAError, match=f"ForkConfig.{field}"):
        ForkConfig(**kw)


def test_empty_prompt_is_refused():
    with pytest.raises(CCAError, match="empty prompt_ids"):
        fork_pivots(None, None, "p", 1.0, [], [5, 6], False, GEN, ForkConfig())
