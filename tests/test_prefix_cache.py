"""PrefixCache: states and teacher-forced logits equal a fresh float64 computation whether the
stored prefix is reused or not; any in-place weight change makes the next lookup a miss; greedy
generation and the pruned pivot search give the same outputs with and without it."""
from __future__ import annotations

import torch

from cca_fast.generation import GenerationConfig, GenerationStats, generate, prefill
from cca_fast.stages.pivots.search import TraceJudge, pivot_for_pair
from cca_fast.stages.pivots.algorithms import teacher_forced_argmax
from cca_fast.generation.prefix import PrefixCache, weights_key
from cca_fast.stages.traces import TracePair
from helpers import VOCAB, make_tiny

# float64 tiny models: a reused prefix and a fresh one differ only in reduction order; 1e-10 is
# ~1e5 ulps of float64 on logits of size ~1, far above that round-off and far below any real error
ATOL = 1e-10


def _tokens(n: int, seed: int, head: list[int] = ()) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return list(head) + torch.randint(4, VOCAB, (n,), generator=g).tolist()


def _model(seed: int = 3, arch: str = "llama"):
    return make_tiny(arch, dtype=torch.float64, seed=seed, attn="sdpa")


def test_state_equals_a_fresh_prefill_on_hits_and_misses():
    model = _model()
    cache = PrefixCache(min_reuse=4)
    shots = _tokens(23, seed=1)  # the shared "exemplars"
    a, b = _tokens(9, seed=2, head=shots), _tokens(5, seed=4, head=shots)
    for i, toks in enumerate([a, b, a, a[:17], b]):  # miss, then hits of 23 / 23 / 16 / 17 positions
        st = cache.state(model, toks)
        fresh = prefill(model, [toks])
        torch.testing.assert_close(st.next_logits, fresh.next_logits, rtol=0, atol=ATOL)
        assert st.next_position.tolist() == [len(toks)] and st.attention_mask.shape == (1, len(toks))
        assert st.cache.get_seq_length() == len(toks)
        assert cache.tokens == toks
    assert cache.stats.misses == 1 and cache.stats.hits == 4
    assert cache.stats.reused_tokens == 23 + 23 + 16 + 17
    # an identical sequence still runs its last token (its logits are the result)
    before = cache.stats.computed_tokens
    cache.state(model, b)
    assert cache.stats.computed_tokens - before == 1


def test_short_common_prefix_is_recomputed():
    model = _model()
    cache = PrefixCache(min_reuse=8)
    cache.state(model, _tokens(20, seed=5))
    other = _tokens(20, seed=5)[:5] + _tokens(10, seed=6)
    st = cache.state(model, other)
    assert cache.stats.hits == 0 and cache.stats.misses == 2
    torch.testing.assert_close(st.next_logits, prefill(model, [other]).next_logits, rtol=0, atol=ATOL)


def test_teacher_forced_logits_equal_one_full_forward():
    model = _model(arch="qwen2")
    cache = PrefixCache(min_reuse=4)
    shots = _tokens(19, seed=7)
    prompt, trace = _tokens(6, seed=8, head=shots), _tokens(11, seed=9)
    cache.state(model, _tokens(4, seed=10, head=shots))  # another problem's prompt: exemplars stored
    got = cache.logits(model, prompt + trace, len(prompt) - 1)
    with torch.no_grad():
        full = model(torch.tensor([prompt + trace])).logits[0, len(prompt) - 1:]
    assert got.shape == full.shape == (len(trace) + 1, full.shape[-1])
    torch.testing.assert_close(got, full, rtol=0, atol=ATOL)
    assert cache.stats.hits == 1 and cache.stats.reused_tokens == 19
    assert teacher_forced_argmax(model, prompt, trace, cache) == teacher_forced_argmax(model, prompt, trace)
    # the pass leaves prompt + trace stored: a completion of one of its prefixes reuses all of it
    st = cache.state(model, prompt + trace[:5])
    assert cache.stats.reused_tokens == 19 + (len(prompt) - 1) + (len(prompt) + 4)  # all but the last token each time
    torch.testing.assert_close(st.next_logits, prefill(model, [prompt + trace[:5]]).next_logits, rtol=0, atol=ATOL)


def test_in_place_weight_change_invalidates():
    model = _model()
    cache = PrefixCache(min_reuse=4)
    toks = _tokens(30, seed=11)
    cache.state(model, toks)
    key = weights_key(model)
    w = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        w[0].add_(0.5)  # what an update step does to a selected row
    assert weights_key(model) != key
    st = cache.state(model, toks)
    assert cache.stats.hits == 0 and cache.stats.misses == 2
    torch.testing.assert_close(st.next_logits, prefill(model, [toks]).next_logits, rtol=0, atol=ATOL)
    # and without the change the next lookup hits
    cache.state(model, toks)
    assert cache.stats.hits == 1


def test_generate_with_a_cache_across_calls_equals_without():
    model = _model(seed=4)
    shots = _tokens(25, seed=12)
    calls = [[_tokens(n, seed=20 + n, head=shots) for n in (3, 7, 5)], [_tokens(6, seed=40, head=shots)],
             [_tokens(4, seed=41, head=shots)] * 3]
    cfg = GenerationConfig(max_new_tokens=9, batch_size=2, stop_on_eos=False)
    cache, stats = PrefixCache(), GenerationStats()
    for prompts in calls:
        got = generate(model, None, prompts, cfg, prefix_cache=cache, stats=stats)
        ref = generate(model, None, prompts, cfg)
        assert [g.output_ids for g in got] == [r.output_ids for r in ref]
    assert cache.stats.hits == 2  # the second and third calls reused the 25 exemplar positions
    # sampling draws do not depend on it either
    scfg = GenerationConfig(max_new_tokens=9, batch_size=3, stop_on_eos=False, do_sample=True, temperature=1.3)
    got = generate(model, None, calls[2], scfg, prefix_cache=cache, row_seeds=[5, 6, 7])
    assert [g.output_ids for g in got] == [g.output_ids for g in generate(model, None, calls[2], scfg,
                                                                           row_seeds=[5, 6, 7])]
    # share_prefix=False (the reference procedure) ignores the cache
    before = (cache.stats.hits, cache.stats.misses)
    generate(model, None, calls[0], GenerationConfig(max_new_tokens=3, share_prefix=False), prefix_cache=cache)
    assert (cache.stats.hits, cache.stats.misses) == before


class _DigitJudge(TraceJudge):
    """Correct iff the trace holds more even than odd token ids (a deterministic stand-in for the
    answer check: any function of the completed trace exercises the search)."""

    def __init__(self):
        self.eos, self.marker = set(), "\nQ:"

    def correct(self, trace):
        return sum(1 if t % 2 == 0 else -1 for t in trace) > 0

    def finished(self, trace):
        return False


def test_fast_pivot_search_with_a_cache_equals_without(monkeypatch):
    import cca_fast.stages.pivots.search as ps

    monkeypatch.setattr(ps, "TraceJudge", lambda *a, **k: _DigitJudge())
    model = _model(seed=6)
    shots = _tokens(21, seed=30)
    gen = GenerationConfig(max_new_tokens=12, batch_size=4, stop_on_eos=False)
    cache = PrefixCache()
    found = 0
    for s in range(8):
        prompt = _tokens(5, seed=50 + s, head=shots)
        sample = generate(model, None, [prompt], GenerationConfig(max_new_tokens=12, do_sample=True, temperature=2.0,
                                                                  stop_on_eos=False), row_seeds=[s])[0].output_ids
        greedy = generate(model, None, [prompt], gen)[0].output_ids
        judge = _DigitJudge()
        pair = TracePair(f"p{s}", 0.0, prompt, greedy, "", judge.correct(greedy), sample_ids=sample,
                         sample_text="", sample_correct=not judge.correct(greedy), sample_index=0)
        with_cache = pivot_for_pair(model, None, pair, "branching", "fast", gen, prefix_cache=cache)
        without = pivot_for_pair(model, None, pair, "branching", "fast", gen)
        reference = pivot_for_pair(model, None, pair, "branching", "reference", gen)
        same = [None if e is None else {**e.to_dict(), "method": None}
                for e in (with_cache[0], without[0], reference[0])]
        assert same[0] == same[1] == same[2]
        assert with_cache[1].completions == without[1].completions
        found += with_cache[0] is not None
    assert found >= 2 and cache.stats.hits >= 8
