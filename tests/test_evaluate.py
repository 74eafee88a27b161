"""Evaluation: records, per-template (macro) vs micro accuracy, JSON round trip, atomic save."""
from __future__ import annotations

import json

import pytest

from cca_fast.data.problem import Problem
from cca_fast.errors import CCAError
from cca_fast.evaluation.evaluate import EvalResult, evaluate, score, write_json_atomic
from cca_fast.generation import Generation, GenerationConfig, GenerationStats
from cca_fast.evaluation.prompting import Exemplar, PromptConfig, build_prompt, encode_prompts
from helpers import ScriptedLM, char_tokenizer, scripts_for

SHOTS = [Exemplar("What is 1 + 1?", "1 + 1 = 2. The final answer is 2.")]

# template "a": 1 problem (right); template "b": 3 problems (1 right, 1 wrong, 1 without answer)
PROBLEMS = [
    Problem("a-0", "Tom has 2 cats and 3 dogs. How many pets?", "#### 5", 5.0, "a"),
    Problem("b-0", "What is 6 times 7?", "#### 42", 42.0, "b"),
    Problem("b-1", "What is 10 minus 4?", "#### 6", 6.0, "b"),
    Problem("b-2", "What is 9 plus 9?", "#### 18", 18.0, "b"),
]
OUTPUTS = [" 2 + 3 = 5. The answer is 5.\nQ: next one",
           " 6 * 7 = 42. The final answer is 42. More text",
           " 10 - 4 = 7. The answer is 7.",
           " nine and nine make many, many, many, many, many, many, many"]


def _gen(text, reason="answer"):
    return Generation([1], [5], text, 1, reason, 1)


def test_score_macro_vs_micro():
    gens = [_gen("The answer is 5."), _gen("The answer is 42."), _gen("The answer is 1,000."),
            _gen("no number", "length")]
    probs = PROBLEMS[:3] + [Problem("c-0", "q", "#### 3", 3.0, "c")]
    records, per, macro, micro = score(probs, gens)
    assert [r["correct"] for r in records] == [True, True, False, False]
    assert [r["prediction"] for r in records] == [5.0, 42.0, 1000.0, None]
    assert per == {"a": {"n": 1, "correct": 1, "accuracy": 1.0}, "b": {"n": 2, "correct": 1, "accuracy": 0.5},
                   "c": {"n": 1, "correct": 0, "accuracy": 0.0}}
    assert macro == pytest.approx((1.0 + 0.5 + 0.0) / 3, abs=1e-15)  # exact up to float division
    assert micro == 0.5


def _scripted(tok, prompt_cfg):
    texts = [build_prompt(p.question, prompt_cfg) for p in PROBLEMS]
    ids = encode_prompts(texts, tok, prompt_cfg)
    return ScriptedLM(scripts_for(ids, [tok(o)["input_ids"] for o in OUTPUTS]))


def test_evaluate_end_to_end_scripted(tmp_path, capsys):
    tok = char_tokenizer()
    prompt_cfg = PromptConfig(exemplars=SHOTS, n_shots=1)
    model = _scripted(tok, prompt_cfg)
    gen_cfg = GenerationConfig(max_new_tokens=40, batch_size=3, share_prefix=False)
    stats = GenerationStats()
    res = evaluate(model, tok, PROBLEMS, prompt=prompt_cfg, generation=gen_cfg, progress=True, stats=stats)
    assert "eval" in capsys.readouterr().err  # the tqdm bar
    assert [r["id"] for r in res.records] == [p.id for p in PROBLEMS]
    assert [r["finish_reason"] for r in res.records] == ["answer", "answer", "answer", "length"]
    assert [r["output"] for r in res.records] == [" 2 + 3 = 5. The answer is 5.",
                                                  " 6 * 7 = 42. The final answer is 42.",
                                                  " 10 - 4 = 7. The answer is 7.", OUTPUTS[3][:40]]
    assert [r["prediction"] for r in res.records] == [5.0, 42.0, 7.0, None]
    assert [r["correct"] for r in res.records] == [True, True, False, False]
    assert res.records[0]["n_generated"] == len(" 2 + 3 = 5. The answer is 5.")
    assert res.records[3]["n_generated"] == 40
    assert res.per_template["a"] == {"n": 1, "correct": 1, "accuracy": 1.0}
    assert res.per_template["b"]["correct"] == 1 and res.per_template["b"]["n"] == 3
    assert res.accuracy == pytest.approx((1.0 + 1 / 3) / 2, abs=1e-15)
    assert res.micro_accuracy == 0.5 and res.n == 4
    assert res.generated_tokens == stats.generated_tokens == sum(r["n_generated"] for r in res.records)
    assert res.meta["prompt_config"]["n_shots"] == 1 and res.meta["generation_config"]["max_new_tokens"] == 40

    path = res.save(tmp_path / "sub" / "eval.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["eval.json"]  # no temporary left behind
    back = EvalResult.load(path)
    assert back.to_json() == json.loads(json.dumps(res.to_json()))
    assert "accuracy 0.6667" in res.summary() and "2/4" in res.summary()


def test_evaluate_errors(tmp_path):
    with pytest.raises(CCAError, match="no problems"):
        evaluate(None, None, [])
    with pytest.raises(CCAError, match="not found"):
        EvalResult.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"accuracy": 1}')
    with pytest.raises(CCAError, match="not an evaluation result"):
        EvalResult.load(bad)


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "x.json"
    write_json_atomic(p, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(p, {"a": object()})  # not serialisable: fails mid-write
    assert json.loads(p.read_text()) == {"a": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]
