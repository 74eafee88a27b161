"""Stage 1a on a fake generator whose output depends only on each row's seed (exact, fast):
batching problems together, and resuming, must not change which sample is kept."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

import cca_fast.stages.traces as traces
from cca_fast.data.problem import Problem
from cca_fast.generation import GenerationConfig
from cca_fast.io import read_jsonl
from cca_fast.stages.traces import GreedyTrace, TraceConfig, collect_traces, problem_seed, sample_flip


@pytest.fixture
def fake_generate(monkeypatch):
    calls = []

    def generate(model, tokenizer, prompts, config, *, row_seeds=None, row_temperatures=None, **kw):
        assert config.do_sample and row_seeds is not None and len(row_seeds) == len(prompts)
        assert row_temperatures is not None and len(row_temperatures) == len(prompts)
        calls.append((len(prompts), tuple(row_temperatures), tuple(prompts)))
        outs = []
        for p, s in zip(prompts, row_seeds):
            answer = random.Random(s).choice([7, 7, 7, 8])  # 3 in 4 samples say 7
            outs.append(SimpleNamespace(output_ids=[s % 1000, answer], text=f" So the answer is {answer}.",
                                        n_generated=2))
        return outs

    monkeypatch.setattr(traces, "generate", generate)
    return calls


def _problems(n):
    probs = [Problem(f"p{i}", "q", "", 7.0 if i % 3 else 8.0, "t") for i in range(n)]
    greedy = {p.id: GreedyTrace(p.id, [1, 2, i], [9], " The answer is 7.", p.gold == 7.0) for i, p in enumerate(probs)}
    return probs, greedy


def test_grouped_sampling_equals_one_problem_at_a_time(fake_generate, tmp_path):
    probs, greedy = _problems(11)
    cfg = TraceConfig(k=10, sample_batch=3, seed=5)
    gen = GenerationConfig(max_new_tokens=4, batch_size=12)
    batched = collect_traces(None, None, probs, greedy, gen, cfg, tmp_path / "t.jsonl", progress=False)
    assert max(n for n, _, _ in fake_generate) > cfg.sample_batch  # several problems shared a batch
    assert any(len(set(t)) == 2 for _, t, _ in fake_generate)  # both temperatures in one call
    by_prompt = {tuple(greedy[p.id].prompt_ids): (1.2 if greedy[p.id].correct else 0.8) for p in probs}
    assert all(t == by_prompt[tuple(x)] for _, ts, xs in fake_generate for t, x in zip(ts, xs))  # each row its own
    for p, pair in zip(probs, batched):
        alone = sample_flip(None, None, p, greedy[p.id], gen, cfg)
        assert pair.to_dict() == alone.to_dict()
        # the kept sample is the FIRST flipped one in seed order, at the right temperature
        answers = [random.Random(problem_seed(5, p.id) + j).choice([7, 7, 7, 8]) for j in range(10)]
        flips = [j for j, a in enumerate(answers) if (a == p.gold) != greedy[p.id].correct]
        assert pair.sample_index == (flips[0] if flips else -1)
        assert pair.temperature == (1.2 if greedy[p.id].correct else 0.8)
    assert sorted(r["problem_id"] for r in read_jsonl(tmp_path / "t.jsonl")) == sorted(p.id for p in probs)


def test_resume_skips_finished_problems(fake_generate, tmp_path):
    probs, greedy = _problems(6)
    cfg, gen = TraceConfig(k=6, sample_batch=2), GenerationConfig(max_new_tokens=4, batch_size=4)
    path = tmp_path / "t.jsonl"
    first = collect_traces(None, None, probs[:3], greedy, gen, cfg, path, progress=False)
    fake_generate.clear()
    both = collect_traces(None, None, probs, greedy, gen, cfg, path, progress=False)
    assert [p.to_dict() for p in both[:3]] == [p.to_dict() for p in first]
    asked = sum(n for n, _, _ in fake_generate)
    assert asked <= 3 * cfg.k  # only the 3 new problems were sampled
    assert len(list(read_jsonl(path))) == 6
