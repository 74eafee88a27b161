"""Batched continuation log-likelihood (cca_fast.evaluation.suites.loglik) against a naive float64 reference:
one unpadded sequence at a time, ``sum(log_softmax(logits)[pos, token])`` over the continuation."""
from __future__ import annotations

import random

import pytest
import torch

from cca_fast.errors import CCAError
from cca_fast.evaluation.suites.loglik import LoglikConfig, LoglikStats, encode_pair, loglikelihood, loglikelihood_tokens
from helpers import VOCAB, char_tokenizer, make_tiny, smol_dir

# float64 models: batching, left padding and a shared-prefix KV cache only change the reduction
# order of float64 sums, ~1e-15 relative on O(10) log-probs; 1e-9 would still catch any
# off-by-one position, wrong target or pad leak (those move scores by O(0.1) or more).
TOL64 = 1e-9


def reference(model, ctx: list[int], cont: list[int]) -> float:
    with torch.no_grad():
        lp = model(torch.tensor([ctx + cont])).logits[0].double().log_softmax(-1)
    return sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def random_pairs(seed: int, n: int, prefix_len: int = 0, max_len: int = 60) -> list[tuple[list[int], list[int]]]:
    """Odd, varied lengths; every second pair starts with a common prefix when ``prefix_len``."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, VOCAB) for _ in range(prefix_len)]
    pairs = []
    for i in range(n):
        ctx = (prefix if i % 2 == 0 else []) + [rng.randrange(3, VOCAB) for _ in range(rng.choice([1, 3, 5, 9]))]
        cont = [rng.randrange(3, VOCAB) for _ in range(rng.choice([1, 2, 3, 7]))]
        pairs.append((ctx[: max_len - len(cont)], cont))
    return pairs


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "qwen2"])
@pytest.mark.parametrize("share", [False, True])
def test_batched_loglik_equals_naive_float64_reference(arch, share):
    model = make_tiny(arch, dtype=torch.float64, seed=5, attn="sdpa")
    pairs = random_pairs(seed=11, n=11, prefix_len=35)
    pairs.append((pairs[0][0], [7]))  # same context as pair 0: may share its model input row
    pairs.append((pairs[0][0] + pairs[0][1][:-1], pairs[0][1][-1:]))  # same input as pair 0, other split
    stats = LoglikStats()
    cfg = LoglikConfig(batch_size=4, logprob_dtype="float64", share_prefix=share, min_shared_prefix=8)
    out = loglikelihood_tokens(model, pairs, cfg, stats=stats)
    ref = [reference(model, c, x) for c, x in pairs]
    assert [o.n_tokens for o in out] == [len(x) for _, x in pairs]
    assert max(abs(o.logprob - r) for o, r in zip(out, ref)) < TOL64
    assert stats.requests == len(pairs) and stats.rows < len(pairs)  # duplicated inputs were merged
    if share:
        assert stats.shared_batches >= 1 and stats.prefix_tokens >= 35  # the prefix path really ran
    else:
        assert stats.shared_batches == 0
    # greedy flag: the continuation made of each position's argmax is greedy, a random one is not
    ctx = pairs[1][0]
    with torch.no_grad():
        nxt = int(model(torch.tensor([ctx])).logits[0, -1].argmax())
    g = loglikelihood_tokens(model, [(ctx, [nxt]), (ctx, [(nxt + 1) % VOCAB])], cfg)
    assert g[0].greedy and not g[1].greedy


def test_float32_logprob_of_float32_model_is_close_to_float64():
    model64 = make_tiny("llama", dtype=torch.float64, seed=2, attn="sdpa")
    model32 = make_tiny("llama", dtype=torch.float32, seed=2, attn="sdpa")
    pairs = random_pairs(seed=3, n=6)
    out = loglikelihood_tokens(model32, pairs, LoglikConfig(batch_size=3))
    ref = [reference(model64, c, x) for c, x in pairs]
    # float32 weights + float32 log-softmax: ~1e-6 relative per log-prob, sums of <= 7 terms of O(5)
    assert max(abs(o.logprob - r) for o, r in zip(out, ref)) < 1e-4
    assert model32.training is False


def test_model_mode_restored_and_no_grad():
    model = make_tiny("llama", dtype=torch.float64, seed=1, attn="sdpa").train()
    pairs = random_pairs(seed=4, n=3)
    out = loglikelihood_tokens(model, pairs, LoglikConfig(logprob_dtype="float64"))
    assert model.training  # restored
    ref = [reference(model.eval(), c, x) for c, x in pairs]  # (tiny models have no dropout, eval == train)
    assert max(abs(o.logprob - r) for o, r in zip(out, ref)) < TOL64


def test_left_truncation_to_max_length():
    model = make_tiny("llama", dtype=torch.float64, seed=6, attn="sdpa")
    rng = random.Random(9)
    ctx, cont = [rng.randrange(3, VOCAB) for _ in range(30)], [rng.randrange(3, VOCAB) for _ in range(4)]
    (o,) = loglikelihood_tokens(model, [(ctx, cont)], LoglikConfig(logprob_dtype="float64", max_length=20))
    # lm-eval: the model sees the last max_length tokens of (ctx + cont)[:-1]
    kept = (ctx + cont)[-21:]
    assert o.truncated == len(ctx + cont) - 21
    assert abs(o.logprob - reference(model, kept[:-len(cont)], cont)) < TOL64
    with pytest.raises(CCAError, match="max_length"):
        loglikelihood_tokens(model, [(ctx, cont * 6)], LoglikConfig(max_length=20))


def test_encode_pair_char_tokenizer_moves_trailing_space():
    tok = char_tokenizer()
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ctx, cont = encode_pair(tok, "Answer: ", "A")
    assert ctx == ids("Answer:") and cont == ids(" A")
    ctx, cont = encode_pair(tok, "", "ab")  # empty context -> the BOS token
    assert ctx == [tok.bos_token_id] and cont == ids("ab")
    with pytest.raises(CCAError, match="no token"):
        encode_pair(tok, "abc", "")


def test_encode_pair_real_tokenizer_is_whole_minus_context():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir())
    for ctx_text, cont_text in [("Q: Where is Paris?\nA:", " In France."), ("Answer:", " B"),
                                ("The value is 12", "34 units")]:  # "1234" may merge across the boundary
        whole = tok(ctx_text + cont_text, add_special_tokens=False)["input_ids"]
        ctx, cont = encode_pair(tok, ctx_text, cont_text)
        assert ctx == tok(ctx_text, add_special_tokens=False)["input_ids"]
        assert ctx + cont == whole or whole[:len(ctx)] != ctx  # exact split when the context is a prefix
        assert cont == whole[len(ctx):]
    assert encode_pair(tok, "Answer: ", "B") == encode_pair(tok, "Answer:", " B")


def test_text_loglikelihood_on_tiny_model_with_char_tokenizer():
    tok = char_tokenizer()
    model = make_tiny("llama", dtype=torch.float64, seed=8, attn="sdpa")
    reqs = [("Q: 2+2?\nA:", " 4"), ("Q: 2+2?\nA:", " 5"), ("abc ", "def"), ("", "xyz")]
    out = loglikelihood(model, tok, reqs, LoglikConfig(logprob_dtype="float64", batch_size=2))
    for (c, x), o in zip(reqs, out):
        ctx, cont = encode_pair(tok, c, x)
        assert abs(o.logprob - reference(model, ctx, cont)) < TOL64


def test_bad_requests_raise():
    model = make_tiny("llama", dtype=torch.float64, seed=8, attn="sdpa")
    with pytest.raises(CCAError, match="at least one token"):
        loglikelihood_tokens(model, [([], [5])])
    with pytest.raises(CCAError, match="batch_size"):
        LoglikConfig(batch_size=0)
    with pytest.raises(CCAError, match="logprob_dtype"):
        LoglikConfig(logprob_dtype="float16")
