"""Generation: greedy equals an uncached float64 reference and HF ``generate`` token for token,
finished rows are removed from the batch, text stops cut where docs/method.md says, sampling is the exact
inverse CDF and reproducible per row."""
from __future__ import annotations

import dataclasses

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cca_fast.errors import CCAError
from cca_fast.models import runtime
from cca_fast.generation import (DecodeState, GenerationConfig, GenerationStats, StopScanner, common_prefix_len,
                                 decode, generate, prefill, row_seed, sample_from_logits)
from cca_fast.evaluation.prompting import ANSWER_PATTERN, PromptConfig, build_prompt, paper_stops
from cca_fast.generation.stops import PatternStop
from helpers import ARCHS, VOCAB, ScriptedLM, char_tokenizer, make_tiny, scripts_for, smol_dir


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return make_tiny("llama", dtype=torch.float64, seed=3, attn="sdpa")


def reference_greedy(model, prompt: list[int], n: int, eos: set[int] = frozenset()) -> list[int]:
    """Greedy continuation by full, uncached, unpadded forwards (the definition of greedy)."""
    ids = list(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            if logits.dtype != torch.float64:  # low precision: the argmax must be clear of round-off
                top2 = logits.double().topk(2).values
                assert float(top2[0] - top2[1]) > 1e-4
            t = int(logits.argmax())
            out.append(t)
            ids.append(t)
            if t in eos:
                break
    return out


def random_prompts(lengths, seed, shared=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(4, VOCAB, (shared,), generator=g).tolist()
    return [head + torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------- greedy correctness

def tiny_for_padding(arch: str, seed: int = 1):
    """float64 + sdpa where the architecture has sdpa; else float32 + eager (transformers' eager
    attention turns fully masked left-pad rows into NaN in float64: see test_nan_logits_error)."""
    try:
        return make_tiny(arch, dtype=torch.float64, seed=seed, attn="sdpa")
    except ValueError:
        return make_tiny(arch, dtype=torch.float32, seed=seed, attn="eager")


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_uncached_reference_every_arch(arch):
    """Left padding, shared-prefix prefill, KV cache, row removal at EOS: every row's tokens equal
    the uncached single-sequence greedy loop (float64: exact ties are practically impossible;
    gemma2 runs in float32, where the top-2 logit gaps of this random model are far above the
    ~1e-6 round-off, checked below)."""
    model = tiny_for_padding(arch)
    prompts = random_prompts([3, 9, 1, 6, 4], seed=7, shared=18)
    n = 10
    refs = [reference_greedy(model, p, n) for p in prompts]
    # pick EOS ids so that rows stop at different steps (plus the model's own EOS id)
    extra = {refs[0][2], refs[3][5]}
    eos = runtime.eos_ids(model, None, extra)
    expected = []
    for r in refs:
        cut = next((i + 1 for i, t in enumerate(r) if t in eos), len(r))
        expected.append(r[:cut])
    for share in (False, True):
        cfg = GenerationConfig(max_new_tokens=n, batch_size=3, eos_token_ids=tuple(extra), share_prefix=share,
                               min_shared_prefix=4)
        gens = generate(model, None, prompts, cfg)
        assert [g.output_ids for g in gens] == expected, (arch, share)
        for g, e, p in zip(gens, expected, prompts):
            assert g.prompt_ids == p and g.prompt_len == len(p) and g.n_generated == len(e)
            assert g.finish_reason == ("eos" if e[-1] in eos else "length")
            assert g.text == ""


def test_greedy_matches_hf_generate_tiny(llama):
    prompts = random_prompts([5, 11, 2, 8], seed=11)
    enc_ids = torch.zeros(len(prompts), 11, dtype=torch.long)
    mask = torch.zeros_like(enc_ids)
    for i, p in enumerate(prompts):
        enc_ids[i, 11 - len(p):] = torch.tensor(p)
        mask[i, 11 - len(p):] = 1
    hf = llama.generate(input_ids=enc_ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                        min_new_tokens=12, pad_token_id=0, eos_token_id=None)
    gens = generate(llama, None, prompts, GenerationConfig(max_new_tokens=12, batch_size=4, stop_on_eos=False))
    for i, g in enumerate(gens):
        assert g.output_ids == hf[i, 11:].tolist()


def test_prefill_with_prefix_equals_full_prefill(llama):
    """The shared-prefix state (prefix once, copied, pad slots in the middle) gives the same next
    logits as prefilling each full sequence; 1e-10 is float64 round-off for a 2-layer model."""
    prompts = random_prompts([1, 7, 4], seed=5, shared=9)
    full = prefill(llama, prompts)
    head = prefill(llama, [prompts[0][:9]])
    before = [t.clone() for t in (head.next_logits, head.attention_mask, head.next_position)]
    part = prefill(llama, [p[9:] for p in prompts], prefix=head)
    torch.testing.assert_close(part.next_logits, full.next_logits, rtol=0, atol=1e-10)
    assert part.next_position.tolist() == [len(p) for p in prompts] == full.next_position.tolist()
    assert part.attention_mask.sum(1).tolist() == [len(p) for p in prompts]
    # the prefix state was not modified (it is reused for every batch)
    for a, b in zip(before, (head.next_logits, head.attention_mask, head.next_position)):
        assert torch.equal(a, b)
    assert head.cache.get_seq_length() == 9


def test_decode_from_repeated_prefix_state(llama):
    """A state prefilled once and repeated k times decodes like k separate greedy runs."""
    prompt = random_prompts([13], seed=2)[0]
    state = prefill(llama, [prompt]).repeat(3)
    assert isinstance(state, DecodeState) and state.batch_size == 3
    outs = decode(llama, state, GenerationConfig(max_new_tokens=6, stop_on_eos=False))
    ref = reference_greedy(llama, prompt, 6)
    assert [o.output_ids for o in outs] == [ref] * 3


def test_rows_are_removed_from_the_running_batch(llama):
    """The padded-batch decoder (``continuous=False``; the path of models the slot decoder does
    not take) drops a finished row from the running batch."""
    prompts = random_prompts([4, 6, 5, 3], seed=9)
    refs = [reference_greedy(llama, p, 9) for p in prompts]
    extra = {refs[1][1], refs[2][4]}
    eos = runtime.eos_ids(llama, None, extra)
    expected = [r[:next((i + 1 for i, t in enumerate(r) if t in eos), len(r))] for r in refs]
    sizes: list[int] = []
    h = llama.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        stats = GenerationStats()
        gens = generate(llama, None, prompts, GenerationConfig(max_new_tokens=9, batch_size=4, continuous=False,
                                                               eos_token_ids=tuple(extra)), stats=stats)
    finally:
        h.remove()
    assert [g.output_ids for g in gens] == expected
    n = [g.n_generated for g in gens]
    assert min(n) < max(n), "test needs rows of different lengths"
    # one prefill of 4 rows, then decode step k runs exactly the rows that have more than k tokens
    assert sizes == [4] + [sum(1 for x in n if x > k) for k in range(1, max(n))]
    assert stats.generated_tokens == sum(n) and stats.sequences == 4 and stats.decode_steps == max(n) - 1


# ---------------------------------------------------------------- scripted stops

def _script(tok, prompts: list[str], outputs: list[str], eos_at: dict[int, int] | None = None):
    ids = [tok(p)["input_ids"] for p in prompts]
    outs = []
    for i, o in enumerate(outputs):
        out = tok(o)["input_ids"]
        if eos_at and i in eos_at:
            out = out[:eos_at[i]] + [tok.eos_token_id] + out[eos_at[i]:]
        outs.append(out)
    return ids, scripts_for(ids, outs)


def test_text_stops_cut_points_and_row_removal(tok):
    prompts = ["a", "bb", "ccc", "d", "ee"]
    outputs = [" 2+2=4. So the answer is 4.\nQ: more",   # answer sentence, after an earlier dot
               " I think\nQ: what",                        # new question
               " 7 and 8 and more",                        # EOS after 5 characters
               " no stop here at all, going on and on",    # length
               " The final answer is 3.50. x"]             # decimal: the sentence ends at the first dot
    ids, scripts = _script(tok, prompts, outputs, eos_at={2: 5})
    model = ScriptedLM(scripts)
    gens = generate(model, tok, ids, GenerationConfig(max_new_tokens=30, batch_size=5, stops=paper_stops()))
    assert [g.finish_reason for g in gens] == ["answer", "new_question", "eos", "length", "answer"]
    assert gens[0].text == " 2+2=4. So the answer is 4."
    assert gens[0].output_ids == tok(" 2+2=4. So the answer is 4.")["input_ids"]
    assert gens[1].text == " I think"
    assert tok.decode(gens[1].output_ids) == " I think\nQ:"  # tokens up to the one completing the marker
    assert gens[2].text == " 7 an" and gens[2].output_ids[-1] == tok.eos_token_id and gens[2].n_generated == 6
    assert gens[3].n_generated == 30 and gens[3].text == outputs[3][:30]
    assert gens[4].text == " The final answer is 3."
    n = [g.n_generated for g in gens]
    assert model.batch_sizes == [5] + [sum(1 for x in n if x > k) for k in range(1, max(n))]


def test_stop_flags_can_be_disabled(tok):
    ids, scripts = _script(tok, ["a"], [" the answer is 4.\nQ: x"])
    cfg = GenerationConfig(max_new_tokens=15)  # no text stop rules: decoding knows no prompt format
    g = generate(ScriptedLM(scripts), tok, ids, cfg)[0]
    assert g.finish_reason == "length" and g.text == " the answer is 4.\nQ: x"[:15]
    cfg = GenerationConfig(max_new_tokens=30, stops=paper_stops()[1:])  # the new-question marker only
    g = generate(ScriptedLM(scripts), tok, ids, cfg)[0]
    assert g.finish_reason == "new_question" and g.text == " the answer is 4."
    cfg = GenerationConfig(max_new_tokens=30, stops=(PatternStop(r"is \d", reason="digit"),))  # any rule
    g = generate(ScriptedLM(scripts), tok, ids, cfg)[0]
    assert g.finish_reason == "digit" and g.text == " the answer is 4"


def _brute_force_stop(tokenizer, ids, marker="\nQ:"):
    """First k such that decode(ids[:k]) shows the answer sentence or the marker."""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=True)
        if re.search(ANSWER_PATTERN, text) or marker in text:
            return k
    return None


def test_stop_scanner_matches_brute_force_on_real_tokenizer():
    """Incremental detokenisation + incremental search stop at the same token as decoding the
    whole prefix after every token, on byte-level BPE text with multi-byte characters."""
    tokenizer = AutoTokenizer.from_pretrained(smol_dir())
    pieces = ["The ", "answer", " is", " ", "12", ".", "5", "\n", "Q", ":", "é", "€", "🙂", "ans", "wer is ",
              "3,000", " so", " then", "Q:", "\nQ", "..", " 7", "-4", "日本", " answer is", "the answer is ", "\n"]
    g = torch.Generator().manual_seed(0)
    n_stopped = 0
    for trial in range(150):
        k = int(torch.randint(3, 30, (1,), generator=g))
        text = "".join(pieces[int(i)] for i in torch.randint(0, len(pieces), (k,), generator=g))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected = _brute_force_stop(tokenizer, ids)
        sc = StopScanner(tokenizer, paper_stops())
        got = None
        for i, t in enumerate(ids):
            if sc.push(t) is not None:
                got = i + 1
                break
        assert got == expected, (text, ids)
        if got is None:
            assert sc.text == tokenizer.decode(ids, skip_special_tokens=True)
        n_stopped += got is not None
    assert 30 < n_stopped < 120, n_stopped  # both outcomes exercised


# ---------------------------------------------------------------- sampling

def _reference_sample(logits, u, temperature, top_p, top_k):
    """float64 inverse CDF over tokens sorted by decreasing probability (index breaks ties)."""
    p = torch.softmax(logits.double() / temperature, -1).tolist()
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    kept, mass, total = [], 0.0, sum(p)
    for rank, i in enumerate(order):
        if top_k and rank >= top_k:
            break
        if top_p < 1.0 and mass >= top_p * total_after_topk(p, order, top_k):
            break
        kept.append(i)
        mass += p[i]
    z = sum(p[i] for i in kept)
    acc, target = 0.0, u * z
    bounds = []
    for i in kept:
        acc += p[i]
        bounds.append((acc, i))
    for acc, i in bounds:
        if acc > target:
            return i, min(abs(a - target) for a, _ in bounds) / z
    return kept[-1], 0.0


def total_after_topk(p, order, top_k):
    return sum(p[i] for i in (order[:top_k] if top_k else order))


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 0.5, 0), (1.0, 1.0, 5),
                                                     (0.8, 0.8, 7)])
def test_sample_from_logits_is_exact_inverse_cdf(temperature, top_p, top_k):
    g = torch.Generator().manual_seed(int(temperature * 100 + top_p * 10 + top_k))
    logits = torch.randn(64, 37, generator=g, dtype=torch.float64) * 2
    u = torch.rand(64, generator=g, dtype=torch.float64)
    got = sample_from_logits(logits.float(), u, temperature=temperature, top_p=top_p, top_k=top_k)
    checked = 0
    for r in range(64):
        tok, margin = _reference_sample(logits[r], float(u[r]), temperature, top_p, top_k)
        if margin < 1e-5:  # float32 cumsum round-off (~1e-7 relative) could move a draw this close to a boundary
            continue
        assert int(got[r]) == tok, r
        checked += 1
    assert checked > 55


def test_sampling_frequencies():
    """20k draws with torch.rand uniforms: each token's frequency within 5 sigma of its
    (top-p renormalised) probability; excluded tokens never drawn."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 20000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = sample_from_logits(logits.expand(n, -1), u, temperature=1.0, top_p=0.8)
    p = torch.softmax(logits[0].double(), -1)
    keep = (torch.cumsum(p, 0) - p) < 0.8
    q = torch.where(keep, p, 0) / p[keep].sum()
    freq = torch.bincount(draws, minlength=6).double() / n
    sigma = (q * (1 - q) / n).sqrt()
    assert torch.all((freq - q).abs() <= 5 * sigma + 1e-12), (freq, q)
    assert int(keep.sum()) == 3 and freq[3:].sum() == 0


def test_sampling_reproducible_and_batch_independent(llama):
    prompts = random_prompts([4, 9, 6, 2, 7], seed=4)
    base = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95, seed=123,
                            stop_on_eos=False, batch_size=5)
    a = [g.output_ids for g in generate(llama, None, prompts, base)]
    b = [g.output_ids for g in generate(llama, None, prompts, base)]
    c = [g.output_ids for g in generate(llama, None, prompts, GenerationConfig(**{**base.to_dict(), "batch_size": 1}))]
    single = [generate(llama, None, [prompts[3]], base, row_seeds=[row_seed(123, 3)])[0].output_ids]
    assert a == b == c and single[0] == a[3]
    d = [g.output_ids for g in generate(llama, None, prompts, GenerationConfig(**{**base.to_dict(), "seed": 124}))]
    assert d != a
    greedy = [g.output_ids for g in generate(llama, None, prompts, GenerationConfig(max_new_tokens=8, stop_on_eos=False))]
    assert greedy != a  # temperature 1.5 on a random model departs from greedy


@pytest.mark.parametrize("continuous", [True, False])
def test_row_temperatures_equal_one_call_per_temperature(llama, continuous):
    """Rows sampled at different temperatures in one call (the slot decoder, and padded batches)
    get exactly the tokens each gets in a call at its own temperature with its own seed; the
    temperatures are checked before any work."""
    prompts = random_prompts([5, 3, 8, 6, 2, 7], seed=11)
    temps = [0.7, 1.3, 0.7, 1.6, 1.3, 0.7]
    seeds = [901 + i for i in range(6)]
    cfg = GenerationConfig(max_new_tokens=9, do_sample=True, top_p=0.9, stop_on_eos=False, batch_size=4,
                           continuous=continuous)
    mixed = [g.output_ids for g in generate(llama, None, prompts, cfg, row_seeds=seeds, row_temperatures=temps)]
    for t in sorted(set(temps)):
        rows = [i for i, x in enumerate(temps) if x == t]
        alone = generate(llama, None, [prompts[i] for i in rows], dataclasses.replace(cfg, temperature=t),
                         row_seeds=[seeds[i] for i in rows])
        assert [g.output_ids for g in alone] == [mixed[i] for i in rows], t
    assert len({tuple(x) for x in mixed}) > 1
    with pytest.raises(CCAError, match="row_temperatures has 2 entries for 6 prompts"):
        generate(llama, None, prompts, cfg, row_temperatures=[1.0, 1.0])
    with pytest.raises(CCAError, match="must all be > 0"):
        generate(llama, None, prompts, cfg, row_temperatures=[1.0] * 5 + [0.0])


# ---------------------------------------------------------------- real model

@pytest.fixture(scope="module")
def smol():
    d = smol_dir()
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(d)


def test_greedy_matches_hf_generate_real_model(smol):
    model, tokenizer = smol
    cfg = PromptConfig(n_shots=2)
    qs = ["Ann has 3 apples and buys 4 more. How many apples does she have?",
          "A train travels 60 km per hour for 3 hours. How far does it go?",
          "Sam has 12 pens and gives a third of them away. How many pens does he keep?"]
    prompts = [build_prompt(q, cfg) for q in qs]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # (transformers 4.56's GGUF tokenizer has none) for HF's batch call only
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    hf = model.generate(**enc, do_sample=False, max_new_tokens=32, pad_token_id=tokenizer.pad_token_id)
    T = enc["input_ids"].shape[1]
    for share in (False, True):
        gens = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=32, batch_size=3, share_prefix=share,
                                                                        stops=paper_stops()))
        for i, g in enumerate(gens):
            ref = hf[i, T:].tolist()
            assert g.output_ids == ref[:g.n_generated], (share, i)
            if g.finish_reason == "answer":
                assert re.search(ANSWER_PATTERN, g.text) and g.text.endswith(".")
                assert g.text == tokenizer.decode(g.output_ids, skip_special_tokens=True)[:len(g.text)]
    assert any(g.finish_reason == "answer" for g in gens)


# ---------------------------------------------------------------- misc

def test_nan_logits_error():
    """float64 + eager + left padding: transformers itself yields NaN logits; we say so clearly
    instead of generating garbage (the padded-batch decoder). (If transformers fixes it, generation
    must then be right.) The slot decoder pads nothing, so it is right either way."""
    model = make_tiny("llama", dtype=torch.float64, seed=1, attn="eager")
    prompts = random_prompts([2, 6], seed=1)
    ids = torch.tensor([[0] * 4 + prompts[0], prompts[1]])
    mask = torch.tensor([[0] * 4 + [1] * 2, [1] * 6])
    hf_nan = bool(torch.isnan(model(input_ids=ids, attention_mask=mask).logits).any())
    cfg = GenerationConfig(max_new_tokens=3, stop_on_eos=False, share_prefix=False, continuous=False)
    slot_cfg = dataclasses.replace(cfg, continuous=True)
    assert [g.output_ids for g in generate(model, None, prompts, slot_cfg)] == \
        [reference_greedy(model, p, 3) for p in prompts]
    if hf_nan:
        with pytest.raises(CCAError, match="NaN logits"):
            generate(model, None, prompts, cfg)
    else:  # pragma: no cover
        assert [g.output_ids for g in generate(model, None, prompts, cfg)] == \
            [reference_greedy(model, p, 3) for p in prompts]


def test_helpers_and_errors(llama):
    assert common_prefix_len([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2 and common_prefix_len([]) == 0
    assert row_seed(0, 1) != row_seed(1, 0) and row_seed(5, 5) == row_seed(5, 5)
    for bad in (dict(max_new_tokens=0), dict(batch_size=0), dict(temperature=0.0), dict(top_p=0.0),
                dict(top_p=1.5), dict(top_k=-1)):
        with pytest.raises(CCAError):
            GenerationConfig(**bad)
    with pytest.raises(CCAError, match="tokenizer"):
        generate(llama, None, ["text prompt"])
    with pytest.raises(CCAError, match="empty prompt"):
        generate(llama, None, [[5], []])
    with pytest.raises(CCAError, match="row_seeds"):
        generate(llama, None, [[5], [6]], row_seeds=[1])
