"""``cca side-effects`` (cca_fast.cli.suites) on a tiny saved model, before/after a delta,
and the lm-eval-harness glue (task YAMLs + utils.py) without lm-eval installed."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from cca_fast.delta import SparseDelta, bitwise_equal
from cca_fast.evaluation.suites import SuiteConfig, mmlu, perplexity, run_suites, truthfulqa
from cca_fast.evaluation.suites.lm_eval import GROUP, TASK_DIR, TASKS
from cca_fast.evaluation.suites.lm_eval import utils as lm_utils
from cca_fast.cli import suites as suites_command
from helpers import TQA, char_tokenizer, make_tiny, run_cli, write_mmlu

GSM = [{"question": "2+3?", "answer": "2+3=<<2+3=5>>5\n#### 5"}, {"question": "4-1?", "answer": "4-1=3\n#### 3"},
       {"question": "7*2?", "answer": "7*2=14\n#### 14"}]


def write_data(root: Path) -> Path:
    write_mmlu(root, {"s_a": 2, "s_b": 3})
    (root / "truthfulqa").mkdir()
    (root / "truthfulqa" / "TruthfulQA.csv").write_text(TQA)
    (root / "gsm8k").mkdir()
    (root / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM))
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny llama (float32, 512 positions) + char tokenizer saved, a delta changing its LM head,
    and synthetic suite data."""
    d = tmp_path_factory.mktemp("suites_cli")
    base = make_tiny("llama", dtype=torch.float32, seed=0)
    base.config.max_position_embeddings = 512
    base.save_pretrained(d / "model")
    char_tokenizer().save_pretrained(d / "model")
    new = make_tiny("llama", dtype=torch.float32, seed=0)
    with torch.no_grad():
        new.lm_head.weight[4:60] += 0.5 * torch.randn(56, new.lm_head.weight.shape[1], generator=torch.Generator().manual_seed(1))
    SparseDelta.from_models(base, new).save(d / "delta")
    write_data(d / "data")
    return d


def test_cli_side_effects_with_delta(work, capsys):
    out = work / "se.json"
    argv = ["side-effects", "--model", str(work / "model"), "--device", "cpu", "--side-data", str(work / "data"),
            "--mmlu-limit", "4", "--truthfulqa-limit", "3", "--ppl-limit", "2", "--output", str(out), "--quiet"]
    assert run_cli(suites_command, argv + ["--delta", str(work / "delta"), "--n-boot", "200"]) == 0
    res = json.loads(out.read_text())
    assert set(res) == {"before", "after", "compare", "delta"}
    for side in ("before", "after"):
        r = res[side]
        assert (r["mmlu"]["n"], r["truthfulqa"]["n"], r["perplexity"]["n"]) == (4, 3, 2)
        assert {it["subject"] for it in r["mmlu"]["per_item"]} == {"s_a", "s_b"}  # stratified
    # the delta changes the LM head: the scores move, and compare() is after - before
    assert res["before"]["perplexity"]["metric"] != res["after"]["perplexity"]["metric"]
    c = res["compare"]["perplexity"]
    assert c["delta"] == pytest.approx(res["after"]["perplexity"]["metric"] - res["before"]["perplexity"]["metric"])
    assert c["n_paired"] == 2 and math.isfinite(c["delta_mean_nll"])
    assert res["compare"]["mmlu"]["n_paired"] == 4
    assert "side-effects (after)" in capsys.readouterr().out

    # without --delta: the plain result, identical to the "before" run (same model, same items)
    assert run_cli(suites_command, argv + ["--suites", "ppl"]) == 0
    plain = json.loads(out.read_text())
    assert set(plain) == {"perplexity", "meta"}
    assert [p["nll"] for p in plain["perplexity"]["per_item"]] == \
        pytest.approx([p["nll"] for p in res["before"]["perplexity"]["per_item"]], abs=1e-5)  # float32 reruns


def test_cli_user_errors(work):
    from cca_fast.errors import CCAError

    with pytest.raises(CCAError, match="--side-data"):
        run_cli(suites_command, ["side-effects", "--model", str(work / "model"), "--side-data", str(work / "nope"),
                                 "--output", str(work / "x.json")])
    with pytest.raises(CCAError, match="--mmlu-limit"):
        run_cli(suites_command, ["side-effects", "--model", str(work / "model"), "--mmlu-limit", "0"])
    with pytest.raises(CCAError, match="unknown side-effect suite"):
        run_cli(suites_command, ["side-effects", "--model", str(work / "model"), "--suites", "mmlu,bogus",
                                 "--side-data", str(work / "data")])


def test_run_suites_leaves_model_untouched(work):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_suites(model, char_tokenizer(), SuiteConfig(data_root=str(work / "data"), mmlu_limit=2, truthfulqa_limit=1,
                                                    ppl_limit=1))
    assert model.training and all(bitwise_equal(p, before[n]) for n, p in model.named_parameters())


# ---------------------------------------------------------------- lm-eval glue

class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))


def test_task_yamls_parse_and_point_at_utils():
    files = sorted(TASK_DIR.glob("*.yaml"))
    cfgs = {p.name: yaml.load(p.read_text(), Loader=_Loader) for p in files}
    tasks = {c["task"]: c for c in cfgs.values() if "task" in c and isinstance(c["task"], str)}
    assert set(tasks) == set(TASKS)
    group = next(c for c in cfgs.values() if c.get("group") == GROUP)
    assert group["task"] == list(TASKS)
    for c in tasks.values():
        kind, ref = c["custom_dataset"]
        assert kind == "function" and ref.startswith("utils.") and callable(getattr(lm_utils, ref[6:]))
        assert c["num_fewshot"] == 0 and c["test_split"] == "test"
    assert tasks["cca_mmlu_local"]["doc_to_choice"] == ["A", "B", "C", "D"]
    assert callable(getattr(lm_utils, tasks["cca_gsm8k_ppl_local"]["process_results"][1][6:]))


def test_lm_eval_documents_equal_the_suites_requests(tmp_path):
    root = write_data(tmp_path)
    kw = {"data_root": str(root), "seed": 3, "mmlu_limit": 4, "truthfulqa_limit": 2, "ppl_limit": 2,
          "pretrained": "ignored", "version": 1.0}  # lm-eval passes model_args and yaml metadata too
    # MMLU: lm-eval builds context = prompt, continuation = " " + letter
    docs = lm_utils.mmlu_rows(**kw)
    items = mmlu.stratified_subset(mmlu.load(root, "test"), 4, 3)
    reqs = mmlu.requests_for(items, mmlu.load(root, "dev"), 5)
    assert [d["id"] for d in docs] == [it.id for it in items]
    assert [(d["prompt"], " " + letter) for d in docs for letter in "ABCD"] == reqs
    assert [d["answer"] for d in docs] == [it.answer for it in items]
    # TruthfulQA: continuation = " " + choice, the best answer is choice 0 (doc_to_target: 0)
    docs = lm_utils.truthfulqa_rows(**kw)
    from cca_fast.evaluation.suites.common import seeded_subset
    items = seeded_subset(truthfulqa.load(root / "truthfulqa" / "TruthfulQA.csv"), 2, 3, "truthfulqa")
    for d, it in zip(docs, items, strict=True):
        assert d["prompt"] == truthfulqa.build_prompt(it.question, True)
        assert [" " + c for c in d["choices"]] == truthfulqa.candidates(it)
    # perplexity: context / continuation (target_delimiter ""), token counts from the tokenizer
    tok = char_tokenizer()
    docs = lm_utils.gsm8k_ppl_rows(tokenizer=tok, **kw)
    items = seeded_subset(perplexity.load(root / "gsm8k" / "test.jsonl"), 2, 3, "gsm8k_ppl")
    for d, it in zip(docs, items, strict=True):
        ctx, cont = perplexity.request_for(it)
        assert (d["context"], d["continuation"]) == (ctx, cont)
        assert d["n_tokens"] == len(cont) and d["n_bytes"] == len(cont.encode())  # char tokenizer: 1 token/char
    assert lm_utils.ppl_process_results(docs[0], [(-6.0, False)]) == \
        {"perplexity": (-6.0, docs[0]["n_tokens"]), "nll": 6.0, "bits_per_byte": (-6.0, docs[0]["n_bytes"])}
    assert lm_utils.truthfulqa_rows(**{**kw, "truthfulqa_preamble": "false"})[0]["prompt"].startswith("Q: ")
