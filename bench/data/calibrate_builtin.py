"""Calibrate the difficulty of the built-in templates (not a test; minutes on CPU).

Greedy 8-shot chain-of-thought accuracy of a small model on seeded instances of the built-in
templates, with the paper's prompt and answer extraction (docs/method.md section 0). The built-in set
is meant to be solved roughly 30% of the time by SmolLM2-135M-Instruct, so that both correct
and wrong traces exist.

    python bench/data/calibrate_builtin.py --model /tmp/smolcache --per-template 2 --seed 0
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from cca_fast.data import load_problems

HEADER = "As an expert problem solver, solve step by step the following mathematical questions.\n\n"
ANSWER_SENTENCE = re.compile(r"answer is[^.]*\.")


def build_prompt(shots: list[dict], question: str) -> str:
    body = "".join(f"Q: {s['question']}\nA: Let's think step by step. {s['target']}\n\n" for s in shots)
    return HEADER + body + f"Q: {question}\nA: Let's think step by step."


def extract(text: str) -> float | None:
    """Cut at a new 'Q:' and after the first 'answer is ....'; last number, commas dropped."""
    text = text.split("Q:")[0]
    m = ANSWER_SENTENCE.search(text)
    if m:
        text = text[:m.end()]
    nums = re.findall(r"-?\d+\.?\d*", text.replace(",", ""))
    return float(nums[-1]) if nums else None


class StopOnAnswer(StoppingCriteria):
    """Per-sequence stop once the new text holds the answer sentence or a new 'Q:'."""

    def __init__(self, tok, start: int) -> None:
        self.tok, self.start = tok, start

    def __call__(self, input_ids, scores, **kw):
        texts = self.tok.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([bool(ANSWER_SENTENCE.search(t)) or "Q:" in t for t in texts],
                            device=input_ids.device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/tmp/smolcache")
    ap.add_argument("--shots", default=str(Path(__file__).resolve().parents[2] / ".." / "shared" /
                                           "data" / "prompts" / "gsm8k_cot_8shot.json"))
    ap.add_argument("--per-template", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    args = ap.parse_args()

    shots = json.loads(Path(args.shots).read_text(encoding="utf-8"))
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    problems = load_problems(None, n_per_template=args.per_template, seed=args.seed)
    hits: dict[str, list[bool]] = {}
    t0 = time.time()
    for i in range(0, len(problems), args.batch):
        batch = problems[i:i + args.batch]
        enc = tok([build_prompt(shots, p.question) for p in batch], return_tensors="pt", padding=True)
        start = enc["input_ids"].shape[1]
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id,
                                 stopping_criteria=StoppingCriteriaList([StopOnAnswer(tok, start)]))
        for p, ids in zip(batch, out[:, start:]):
            hits.setdefault(p.template, []).append(extract(tok.decode(ids, skip_special_tokens=True)) == p.gold)
        print(f"{i + len(batch)}/{len(problems)} done, {time.time() - t0:.0f} s", flush=True)
    total = sum(len(v) for v in hits.values())
    print(json.dumps({t: sum(v) / len(v) for t, v in sorted(hits.items())}))
    print(f"accuracy {sum(sum(v) for v in hits.values()) / total:.3f} over {total} problems")


if __name__ == "__main__":
    main()
