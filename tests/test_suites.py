"""Side-effect suites (cca_fast.evaluation.suites): exact MMLU prompt text, stratified subsets, TruthfulQA
parsing and scoring, perplexity against a float64 reference, data errors, compare(), and a real
run of run_suites on the shared data with the embedded default model."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from cca_fast.errors import DataError
from cca_fast.evaluation.suites import SuiteConfig, compare, run_suites
from cca_fast.evaluation.suites import mmlu, perplexity, truthfulqa
from cca_fast.evaluation.suites.common import resolve_data_root, seeded_subset
from cca_fast.evaluation.suites.loglik import Loglik, LoglikConfig, encode_pair
from helpers import MMLU_HEADER, TQA, char_tokenizer, make_tiny, write_mmlu

HEADER = MMLU_HEADER


# ---------------------------------------------------------------- MMLU

def test_mmlu_prompt_text_exact(tmp_path):
    d = tmp_path / "mmlu"
    (d / "dev").mkdir(parents=True)
    (d / "test").mkdir()
    (d / "dev" / "high_school_math_dev.csv").write_text(
        HEADER + '"What is 1+1? ",1,2,3,4,1\n'
        + '"Pick, the ""odd"" one",a,b,c,"d, e",3\n'
        + "Q3,x,y,z,w,0\nQ4,x,y,z,w,2\nQ5,x,y,z,w,1\nQ6 (not a shot),x,y,z,w,1\n")
    (d / "test" / "high_school_math_test.csv").write_text(HEADER + '"  Is 2 prime?\n",Yes,No,Maybe,Never,0\n')
    test = mmlu.load(tmp_path, "test")["high_school_math"]
    dev = mmlu.load(tmp_path, "dev")
    (prompt, cont), *rest = mmlu.requests_for(test, dev, 5)
    # written out by hand from lm-eval's mmlu template: description, first 5 dev rows, the question
    expected = ("The following are multiple choice questions (with answers) about high school math.\n\n"
                "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
                'Pick, the "odd" one\nA. a\nB. b\nC. c\nD. d, e\nAnswer: D\n\n'
                "Q3\nA. x\nB. y\nC. z\nD. w\nAnswer: A\n\n"
                "Q4\nA. x\nB. y\nC. z\nD. w\nAnswer: C\n\n"
                "Q5\nA. x\nB. y\nC. z\nD. w\nAnswer: B\n\n"
                "Is 2 prime?\nA. Yes\nB. No\nC. Maybe\nD. Never\nAnswer:")
    assert prompt == expected
    assert [cont] + [r[1] for r in rest] == [" A", " B", " C", " D"] and all(r[0] == expected for r in rest)
    assert test[0].id == "high_school_math/0" and test[0].answer == 0
    zero = mmlu.requests_for(test, {}, 0)[0][0]
    assert zero == ("The following are multiple choice questions (with answers) about high school math.\n\n"
                    "Is 2 prime?\nA. Yes\nB. No\nC. Maybe\nD. Never\nAnswer:")


def test_mmlu_stratified_limit_deterministic_and_covers_subjects(tmp_path):
    sizes = {"s_a": 1, "s_b": 3, "s_c": 4, "s_d": 6, "s_e": 10}
    write_mmlu(tmp_path, sizes)
    by = mmlu.load(tmp_path, "test")
    a = mmlu.stratified_subset(by, 7, seed=0)
    assert [it.id for it in a] == [it.id for it in mmlu.stratified_subset(by, 7, seed=0)]
    assert len(a) == 7 and len({it.id for it in a}) == 7
    assert {it.subject for it in a} == set(sizes)  # 7 >= 5 subjects: every subject is present
    counts = {s: sum(it.subject == s for it in a) for s in sizes}
    assert max(counts.values()) - min(c for s, c in counts.items() if sizes[s] > 1) <= 1  # round-robin
    two = mmlu.stratified_subset(by, 2, seed=0)
    assert len({it.subject for it in two}) == 2
    picks = {tuple(it.id for it in mmlu.stratified_subset(by, 7, seed=s)) for s in range(6)}
    assert len(picks) > 1  # the seed matters
    everything = mmlu.stratified_subset(by, None, seed=0)
    assert len(everything) == 24 and mmlu.stratified_subset(by, 100, seed=3) == everything
    with pytest.raises(DataError, match="positive"):
        mmlu.stratified_subset(by, 0, seed=0)


def fake_scorer(score_fn):
    """A stand-in for ``loglikelihood``: each request scored by ``score_fn(context, continuation)``."""
    def scorer(model, tokenizer, requests, config=None, *, stats=None):
        return [Loglik(float(score_fn(c, x)), 1, False) for c, x in requests]
    return scorer


def test_mmlu_scoring_argmax_and_per_subject(tmp_path, monkeypatch):
    write_mmlu(tmp_path, {"s_a": 2, "s_b": 3})
    # gold of test row i is (i + 1) % 4; the fake model picks the gold letter except for "s_b test q2"
    def score(ctx, cont):
        q = ctx.rsplit("\n\n", 1)[1].split("?")[0]
        i = int(q.rsplit("q", 1)[1])
        want = "ABCD"[(i + 1) % 4] if q != "s_b test q2" else "A"
        return 0.0 if cont == f" {want}" else -3.0
    monkeypatch.setattr(mmlu, "loglikelihood", fake_scorer(score))
    res = mmlu.evaluate_mmlu(None, None, tmp_path, limit=None, seed=0)
    assert res.n == 5 and res.metric == pytest.approx(4 / 5)
    assert res.details["per_subject"] == {"s_a": {"accuracy": 1.0, "n": 2}, "s_b": {"accuracy": 2 / 3, "n": 3}}
    assert res.details["macro_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    bad = next(p for p in res.per_item if p["id"] == "s_b/2")
    assert bad["pred"] == 0 and bad["gold"] == 3 and not bad["correct"]
    monkeypatch.setattr(mmlu, "loglikelihood", fake_scorer(lambda c, x: 0.0))  # all tied: first letter wins
    assert all(p["pred"] == 0 for p in mmlu.evaluate_mmlu(None, None, tmp_path).per_item)


# ---------------------------------------------------------------- TruthfulQA


def test_truthfulqa_parsing_and_prompt(tmp_path):
    p = tmp_path / "truthfulqa" / "TruthfulQA.csv"
    p.parent.mkdir()
    p.write_text(TQA)
    items = truthfulqa.load(p)
    assert [it.id for it in items] == ["truthfulqa/0", "truthfulqa/1", "truthfulqa/2"]
    assert items[0].incorrect == ("Yes it is green", "It is red", "Green")  # stripped, empty part dropped
    assert truthfulqa.candidates(items[1]) == [" Four", " Five", " Three"]
    assert truthfulqa.build_prompt("Q?", preamble=False) == "Q: Q?\nA:"
    pre = truthfulqa.build_prompt("Q?")
    assert pre.startswith("Q: What is human life expectancy in the United States?\nA: Human life expectancy")
    assert pre.endswith("A: The 1992 Olympics were held in Barcelona, Spain.\n\nQ: Q?\nA:")
    assert pre.count("\n\nQ: ") == 6  # 6 primer questions, then ours


def test_truthfulqa_scoring_picks_argmax(tmp_path, monkeypatch):
    (tmp_path / "truthfulqa").mkdir()
    (tmp_path / "truthfulqa" / "TruthfulQA.csv").write_text(TQA)
    table = {" No it is blue": -1.0, " Yes it is green": -2.0, " It is red": -5.0, " Green": -1.5,  # best wins
             " Four": -4.0, " Five": -3.0, " Three": -6.0,  # an incorrect answer wins
             " Tie best": -2.0, " Tie wrong": -2.0}  # tie: the best answer (first) wins, as argmax
    seen_prompts = set()

    def score(ctx, cont):
        seen_prompts.add(ctx)
        return table[cont]
    monkeypatch.setattr(truthfulqa, "loglikelihood", fake_scorer(score))
    res = truthfulqa.evaluate_truthfulqa(None, None, tmp_path, preamble=False)
    assert [p["correct"] for p in res.per_item] == [True, False, True]
    assert res.metric == pytest.approx(2 / 3) and res.n == 3
    assert seen_prompts == {"Q: Is the sky green?\nA:", "Q: What is 2+2?\nA:", "Q: Tie question?\nA:"}
    p0 = res.per_item[0]
    z = sum(math.exp(v) for v in (-1.0, -2.0, -5.0, -1.5))
    assert p0["p_best"] == pytest.approx(math.exp(-1.0) / z, rel=1e-12)
    assert p0["logprob_incorrect_max"] == -1.5 and p0["n_candidates"] == 4
    sub = truthfulqa.evaluate_truthfulqa(None, None, tmp_path, limit=2, seed=1, preamble=False)
    assert sub.n == 2 and [p["id"] for p in sub.per_item] == \
        [p["id"] for p in truthfulqa.evaluate_truthfulqa(None, None, tmp_path, limit=2, seed=1, preamble=False).per_item]


def test_seeded_subset():
    xs = list(range(50))
    a = seeded_subset(xs, 10, 0, "t")
    assert a == seeded_subset(xs, 10, 0, "t") and a == sorted(a) and len(set(a)) == 10
    assert a != seeded_subset(xs, 10, 1, "t") and seeded_subset(xs, None, 0, "t") == xs
    assert seeded_subset(xs, 80, 0, "t") == xs


# ---------------------------------------------------------------- perplexity

def test_perplexity_equals_exp_mean_nll_of_float64_reference(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    recs = [{"question": "2+3?", "answer": "2+3=<<2+3=5>>5\n#### 5"},
            {"question": "Ann has 4, eats 1?", "answer": "4-1=3\n#### 3"},
            {"question": "7*2?", "answer": "#### 14"}]
    (tmp_path / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    tok = char_tokenizer()
    model = make_tiny("llama", dtype=torch.float64, seed=4, attn="sdpa")
    res = perplexity.evaluate_perplexity(model, tok, tmp_path, loglik=LoglikConfig(logprob_dtype="float64", batch_size=2))
    nll, ntok = [], []
    for r in recs:
        ctx_text = f"Question: {r['question']}\nAnswer:"
        cont_text = " " + r["answer"].replace("<<2+3=5>>", "")
        ctx, cont = encode_pair(tok, ctx_text, cont_text)
        with torch.no_grad():
            lp = model(torch.tensor([ctx + cont])).logits[0].double().log_softmax(-1)
        nll.append(-sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
        ntok.append(len(cont))
    # float64 model and log-softmax, batched vs one-at-a-time: reduction order only (~1e-15)
    assert [p["nll"] for p in res.per_item] == pytest.approx(nll, abs=1e-9)
    assert [p["n_tokens"] for p in res.per_item] == ntok
    assert res.metric == pytest.approx(math.exp(sum(nll) / sum(ntok)), rel=1e-10)
    assert res.details["mean_nll"] == pytest.approx(sum(nll) / sum(ntok), rel=1e-10)
    assert res.details["nll_per_item_mean"] == pytest.approx(sum(nll) / 3, rel=1e-10)
    assert perplexity.request_for(perplexity.load(tmp_path / "gsm8k" / "test.jsonl")[0]) == \
        ("Question: 2+3?\nAnswer:", " 2+3=5\n#### 5")
    assert perplexity.request_for(perplexity.SolutionItem("x", "q", "a <<1+1=2>>2"), context=False,
                                  strip_calculator=False) == ("", "a <<1+1=2>>2")


# ---------------------------------------------------------------- data errors

def test_missing_files_name_the_path_and_what_to_pass(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"nope.*does not exist.*--side-data"):
        resolve_data_root(tmp_path / "nope")
    monkeypatch.setenv("CCA_SHARED_DATA", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="CCA_SHARED_DATA=.*absent"):
        resolve_data_root()
    monkeypatch.delenv("CCA_SHARED_DATA")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(DataError, match=r"shared/data.*data_root.*--side-data"):
        resolve_data_root()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert resolve_data_root() == (tmp_path / "shared" / "data").resolve()

    empty = tmp_path / "empty"
    empty.mkdir()
    for suite, pattern in [("mmlu", r"MMLU test file .*mmlu/test"), ("truthfulqa", r"truthfulqa/TruthfulQA\.csv"),
                           ("perplexity", r"gsm8k/test\.jsonl")]:
        with pytest.raises(DataError, match=pattern + r".*--side-data"):
            run_suites(None, None, SuiteConfig(data_root=str(empty), suites=(suite,)))
    write_mmlu(empty, {"s_a": 1})
    (empty / "mmlu" / "dev" / "s_a_dev.csv").unlink()
    with pytest.raises(DataError, match="MMLU dev file .*s_a_dev.csv"):
        run_suites(None, None, SuiteConfig(data_root=str(empty), suites=("mmlu",)))
    (empty / "mmlu" / "dev" / "s_a_dev.csv").write_text("q,a\n1,2\n")
    with pytest.raises(DataError, match="header"):
        run_suites(None, None, SuiteConfig(data_root=str(empty), suites=("mmlu",)))


# ---------------------------------------------------------------- compare

def _acc(ids_correct: dict[str, bool], name="truthfulqa"):
    n = len(ids_correct)
    return {"name": name, "metric_name": "accuracy", "metric": sum(ids_correct.values()) / n, "higher_is_better": True,
            "n": n, "details": {}, "per_item": [{"id": k, "correct": v} for k, v in ids_correct.items()]}


def test_compare_paired_deltas():
    before = {"truthfulqa": _acc({"a": True, "b": False, "c": False, "d": True, "x": True})}
    after = {"truthfulqa": _acc({"a": True, "b": True, "c": True, "d": False, "y": False})}
    ppl_b = [{"id": "p", "nll": 10.0, "n_tokens": 5}, {"id": "q", "nll": 4.0, "n_tokens": 3}]
    ppl_a = [{"id": "p", "nll": 9.0, "n_tokens": 5}, {"id": "q", "nll": 4.5, "n_tokens": 3}]
    before["perplexity"] = {"metric_name": "perplexity", "metric": math.exp(14 / 8), "higher_is_better": False, "n": 2,
                            "details": {}, "per_item": ppl_b}
    after["perplexity"] = {"metric_name": "perplexity", "metric": math.exp(13.5 / 8), "higher_is_better": False,
                           "n": 2, "details": {}, "per_item": ppl_a}
    c = compare(before, after, n_boot=500, seed=1)
    t = c["truthfulqa"]
    assert t["n_paired"] == 4 and t["gained"] == 2 and t["lost"] == 1
    assert t["delta"] == pytest.approx(3 / 5 - 3 / 5) and t["delta_paired"] == pytest.approx(0.25)
    assert t["ci"][0] <= t["delta_paired"] <= t["ci"][1] and t["ci"][0] >= -1 and t["ci"][1] <= 1
    p = c["perplexity"]
    assert p["delta_mean_nll"] == pytest.approx(-0.5 / 8) and p["ppl_ratio"] == pytest.approx(math.exp(-0.5 / 8))
    assert p["ppl_ratio_ci"][0] <= p["ppl_ratio"] <= p["ppl_ratio_ci"][1]
    assert compare(before, after, n_boot=500, seed=1) == c  # seeded


# ---------------------------------------------------------------- the real data and model

@pytest.fixture(scope="module")
def real_data() -> Path:
    """``$CCA_SHARED_DATA``, else ``<repo>/../shared/data`` (the tests/data convention)."""
    env = os.environ.get("CCA_SHARED_DATA")
    root = Path(env) if env else (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
    if not (root / "mmlu" / "test").is_dir():
        pytest.skip(f"shared data with mmlu/ absent at {root} (set CCA_SHARED_DATA)")
    return root


def test_run_suites_real_data_default_model(real_data):
    import cca_fast

    try:
        model, tok = cca_fast.load_model()
    except cca_fast.CCAError as e:
        pytest.skip(f"default model unavailable: {e}")
    cfg = SuiteConfig(data_root=str(real_data), mmlu_limit=2, mmlu_shots=1, truthfulqa_limit=1, ppl_limit=1)
    res = run_suites(model, tok, cfg)
    m, t, p = res["mmlu"], res["truthfulqa"], res["perplexity"]
    assert m["n"] == 2 and len(m["per_item"]) == 2 and 0.0 <= m["metric"] <= 1.0
    assert len({it["subject"] for it in m["per_item"]}) == 2  # stratified: 2 subjects
    assert all(len(it["logprobs"]) == 4 and all(lp < 0 for lp in it["logprobs"]) for it in m["per_item"])
    assert t["n"] == 1 and 0.0 <= t["metric"] <= 1.0 and all(0 < it["p_best"] < 1 for it in t["per_item"])
    assert p["n"] == 1 and 1.0 < p["metric"] < 100.0  # a 135M instruct model on GSM8K prose: ~2-10
    assert res["meta"]["model"]["dtype"] == "float32" and json.dumps(res)
    # one TruthfulQA score against a one-sequence float32 forward: float32 logits through 30 layers
    # differ by ~1e-5 between padded/prefix-cached batches and one sequence; 1e-2 on a sum of ~10
    # log-probs still catches any wrong position or token (errors of O(1))
    item = truthfulqa.load(real_data / "truthfulqa" / "TruthfulQA.csv")[int(t["per_item"][0]["id"].split("/")[1])]
    ctx, cont = encode_pair(tok, truthfulqa.build_prompt(item.question), truthfulqa.candidates(item)[0])
    with torch.no_grad():
        lp = model(torch.tensor([ctx + cont])).logits[0].double().log_softmax(-1)
    ref = sum(float(lp[len(ctx) - 1 + j, x]) for j, x in enumerate(cont))
    assert abs(t["per_item"][0]["logprob_best"] - ref) < 1e-2
