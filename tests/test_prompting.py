"""Prompt layout, exemplar loading and the paper's answer extractor (docs/method.md section 0)."""
import json
import re
from fractions import Fraction

import pytest

from cca_fast.errors import CCAError, DataError
from cca_fast.evaluation.prompting import (DEFAULT_INSTRUCTION, Exemplar, PromptConfig, build_prompt, chat_messages,
                                encode_prompts, extract_answer, find_answer_end, gold_from_answer, is_correct,
                                load_exemplars)

@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from helpers import smol_dir
    return AutoTokenizer.from_pretrained(smol_dir())


SHOTS = [Exemplar("What is 2 + 3?", "2 + 3 = 5. The final answer is 5."),
         Exemplar("What is 4 * 2?", "4 * 2 = 8. The final answer is 8.")]


# ---------------------------------------------------------------- prompt layout

def test_plain_prompt_exact_layout():
    cfg = PromptConfig(exemplars=SHOTS, n_shots=2)
    expected = (
        "As an expert problem solver, solve step by step the following mathematical questions.\n"
        "\n"
        "Q: What is 2 + 3?\n"
        "A: Let's think step by step. 2 + 3 = 5. The final answer is 5.\n"
        "\n"
        "Q: What is 4 * 2?\n"
        "A: Let's think step by step. 4 * 2 = 8. The final answer is 8.\n"
        "\n"
        "Q: How many legs do 3 cats have?\n"
        "A: Let's think step by step."
    )
    assert build_prompt("How many legs do 3 cats have?", cfg) == expected


def test_plain_prompt_default_has_8_builtin_shots():
    p = build_prompt("Q?", PromptConfig())
    assert p.startswith(DEFAULT_INSTRUCTION + "\n\nQ: ")
    assert p.count("\nA: Let's think step by step. ") == 8
    assert p.count("Q: ") == 9
    assert p.endswith("\n\nQ: Q?\nA: Let's think step by step.")
    assert "\n\n\n" not in p


def test_zero_shot_and_no_instruction():
    assert build_prompt("X?", PromptConfig(n_shots=0)) == DEFAULT_INSTRUCTION + "\n\nQ: X?\nA: Let's think step by step."
    assert build_prompt("X?", PromptConfig(n_shots=0, instruction="")) == "Q: X?\nA: Let's think step by step."


def test_n_shots_too_many_and_bad_mode():
    with pytest.raises(CCAError, match="only 2 exemplars"):
        build_prompt("x", PromptConfig(exemplars=SHOTS, n_shots=3))
    with pytest.raises(CCAError, match="prompt mode"):
        PromptConfig(mode="fancy")


class FakeChatTokenizer:
    chat_template = "fake"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


def test_chat_prompt_turns():
    cfg = PromptConfig(mode="chat", exemplars=SHOTS, n_shots=2)
    msgs = chat_messages("Final?", cfg)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[0]["content"] == DEFAULT_INSTRUCTION + "\n\nWhat is 2 + 3?"
    assert msgs[1]["content"] == "Let's think step by step. 2 + 3 = 5. The final answer is 5."
    assert msgs[2]["content"] == "What is 4 * 2?"
    assert msgs[4]["content"] == "Final?"
    sys_msgs = chat_messages("Final?", PromptConfig(mode="chat", exemplars=SHOTS, n_shots=1, instruction_as_system=True))
    assert sys_msgs[0] == {"role": "system", "content": DEFAULT_INSTRUCTION}
    assert sys_msgs[1]["content"] == "What is 2 + 3?"
    text = build_prompt("Final?", cfg, FakeChatTokenizer())
    assert text.endswith("<user>Final?</user><assistant>")
    with pytest.raises(CCAError, match="chat template"):
        build_prompt("Final?", cfg, None)


def test_chat_prompt_real_template_and_encoding(smol_tokenizer):
    cfg = PromptConfig(mode="chat", n_shots=2)
    text = build_prompt("How much?", cfg, smol_tokenizer)
    assert text.count("<|im_start|>user") == 3 and text.count("<|im_start|>assistant") == 3
    assert text.endswith("<|im_start|>assistant\n")
    ids = encode_prompts([text], smol_tokenizer, cfg)[0]
    assert ids == smol_tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- exemplars

def test_builtin_exemplars_are_consistent():
    ex = load_exemplars()
    assert len(ex) == 8 and len({e.question for e in ex}) == 8
    arith = re.compile(r"((?:\d+\s*[-+*/]\s*)+\d+)\s*=\s*\$?(\d+)")
    for e in ex:
        m = re.search(r"The final answer is (\d+)\.$", e.target)
        assert m, e.target
        # the final answer sentence is the first answer sentence, so generation would stop there
        assert find_answer_end(e.target) == len(e.target)
        assert extract_answer(e.target) == float(m.group(1))
        steps = arith.findall(e.target)
        assert steps, e.target
        for expr, value in steps:  # every written calculation is right (exact rational arithmetic)
            tokens = re.findall(r"\d+|[-+*/]", expr)
            total = _eval_left_to_right_with_precedence(tokens)
            assert total == Fraction(int(value)), (expr, value)


def _eval_left_to_right_with_precedence(tokens):
    """Evaluate ``a op b op c`` with * and / before + and -, exactly."""
    terms, ops = [Fraction(int(tokens[0]))], []
    for op, num in zip(tokens[1::2], tokens[2::2]):
        n = Fraction(int(num))
        if op == "*":
            terms[-1] *= n
        elif op == "/":
            terms[-1] /= n
        else:
            ops.append(op)
            terms.append(n)
    total = terms[0]
    for op, t in zip(ops, terms[1:]):
        total = total + t if op == "+" else total - t
    return total


def test_load_exemplars_file_and_errors(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"question": " q1 ", "target": "t. The final answer is 1."}]))
    assert load_exemplars(good) == [Exemplar("q1", "t. The final answer is 1.")]
    assert build_prompt("z", PromptConfig(exemplars=str(good), n_shots=1)).count("Q: ") == 2
    cases = {
        "missing.json": (None, "not found"),
        "bad.json": ("[{", "not valid JSON"),
        "dict.json": ('{"question": "q"}', "non-empty JSON list"),
        "empty.json": ("[]", "non-empty JSON list"),
        "nokey.json": ('[{"question": "q"}]', "missing key"),
        "notstr.json": ('[{"question": "q", "target": 3}]', "non-empty strings"),
        "notobj.json": ('["q"]', "expected an object"),
    }
    for name, (content, msg) in cases.items():
        p = tmp_path / name
        if content is not None:
            p.write_text(content)
        with pytest.raises(DataError, match=msg):
            load_exemplars(p)


def test_paper_exemplar_file_loads_if_present():
    from pathlib import Path
    p = Path("/work/shared/data/prompts/gsm8k_cot_8shot.json")
    if not p.exists():
        pytest.skip("shared data not available")
    ex = load_exemplars(p)
    assert len(ex) == 8 and all(e.target.rstrip().endswith(".") for e in ex)


# ---------------------------------------------------------------- answer extraction

@pytest.mark.parametrize("text,expected", [
    ("So 3 + 4 = 7. The final answer is 7.", 7.0),
    ("The answer is 1,234.", 1234.0),                       # commas dropped
    ("He owes 5. The answer is -12.", -12.0),               # negative
    ("The final answer is 3.50.", 3.0),                     # paper quirk: the sentence ends at the first dot
    ("The final answer is 5.", 5.0),                        # "5." parses as 5.0
    ("Total 2.75 dollars", 2.75),                           # no answer sentence: last number, decimal kept
    ("The answer is 10. Next question 99.", 10.0),          # text after the answer sentence ignored
    ("The answer is $45.", 45.0),                           # dollar sign
    ("The answer is 1. Then the answer is 2.", 1.0),        # first answer sentence wins
    ("I do not know", None),                                # no number
    ("", None),
    ("the answer is seven. then 8", None),                  # cut after 'seven.' leaves no number
    ("8 apples; the answer is unclear.", 8.0),              # last number before the cut
    ("x = 10-4 so the answer is 6", 6.0),                   # no dot: no cut, last number
    ("10-4", -4.0),                                         # '-?' binds to the 4 (paper regex)
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct_and_gold():
    assert is_correct(7.0, 7) and not is_correct(7.0000001, 7.0) and not is_correct(None, 0.0)
    assert gold_from_answer("a\nb\n#### 1,024") == 1024.0
    assert gold_from_answer("#### -3.5") == -3.5
    assert gold_from_answer("so #### $40") == 40.0
    with pytest.raises(DataError, match="####"):
        gold_from_answer("The answer is 4.")
