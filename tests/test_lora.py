"""LoRA baseline: gold targets in the exemplar style, loss on target tokens only (against a float64
per-example reference, any padding, shared prefix or not), training lowers the loss, merged
weights give the peft model's logits and restore bit-exactly, the model is plain again after
training, trainable-parameter count, best-epoch selection, save/load the peft way, missing peft."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cca_fast.baselines.lora import train as L
from cca_fast.data.problem import Problem
from cca_fast.errors import CCAError, DataError
from cca_fast.evaluation.prompting import PromptConfig, build_prompt, encode_prompts, extract_answer, gold_from_answer
from helpers import CONFIGS, char_tokenizer, make_tiny

# peft (in the tests' own get_peft_model / from_pretrained calls) reads a deprecated transformers property
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
REPO = Path(__file__).resolve().parents[1]
NATALIA = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
           "altogether in April and May.\n#### 72")
SHOT = [{"question": "Ann has 2 pens and buys 3. How many?", "target": "2 + 3 = 5. The final answer is 5."}]
PROMPT = PromptConfig(exemplars=SHOT, n_shots=1)


def shared_data() -> Path:
    env = os.environ.get("CCA_SHARED_DATA")
    return Path(env) if env else (REPO / ".." / "shared" / "data").resolve()


def problems(n: int = 6) -> list[Problem]:
    return [Problem(f"p{i}", f"Tom has {i} apples and gets {i + 2} more. How many?",
                    f"He has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2}",
                    2 * i + 2) for i in range(n)]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ---- gold targets -----------------------------------------------------------------------------
def test_gold_target_exact_on_a_gsm8k_solution():
    assert L.gold_target(NATALIA) == ("Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether "
                                      "in April and May. The final answer is 72.")
    p = Problem("x", "q", "Cost: $<<2*3=6>>6.\n\n#### $1,250", 1250.0)
    assert L.gold_target(p) == "Cost: $6. The final answer is 1250."
    with pytest.raises(DataError, match="####"):
        L.gold_target("no final line")
    with pytest.raises(DataError, match="no solution"):
        L.gold_target(Problem("y", "q", "", 1.0))


def test_gold_target_on_real_gsm8k_lines():
    path = shared_data() / "gsm8k" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent (set CCA_SHARED_DATA)")
    lines = path.read_text(encoding="utf-8").splitlines()[:300]
    for line in lines:
        answer = json.loads(line)["answer"]
        t = L.gold_target(answer)
        gold = gold_from_answer(answer)
        assert "<<" not in t and ">>" not in t and "####" not in t and "\n" not in t and "  " not in t
        assert t.endswith(f"The final answer is {gold:g}.")
        assert extract_answer(t) == gold  # the paper's extractor reads the target's answer right


def test_target_text_per_prompt_mode():
    p = problems(1)[0]
    assert L.target_text(p, PROMPT) == " He has 0 + 2 = 2 apples. The final answer is 2."
    assert L.target_text(p, PromptConfig(mode="chat")) == "Let's think step by step. He has 0 + 2 = 2 apples. " \
                                                        "The final answer is 2."


def test_sft_examples_are_prompt_then_target():
    tok = char_tokenizer()
    ps = problems(3)
    ex = L.build_sft_examples(ps, tok, PROMPT)
    for p, e in zip(ps, ex):
        text = build_prompt(p.question, PROMPT)
        assert list(e.prompt_ids) == encode_prompts([text], tok, PROMPT)[0]
        assert tok.decode(list(e.prompt_ids) + list(e.target_ids)) == tok.decode(
            encode_prompts([text], tok, PROMPT)[0]) + " " + L.gold_target(p)
        assert tok.decode(list(e.target_ids)) == " " + L.gold_target(p)


# ---- the loss ---------------------------------------------------------------------------------
def reference_nll(model: nn.Module, examples) -> tuple[float, int]:
    """Each example alone, unpadded, full logits, float64 log-softmax over target positions."""
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids = list(e.prompt_ids) + list(e.target_ids)
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            for j in range(len(e.prompt_ids), len(ids)):
                total -= float(logp[j - 1, ids[j]])
                count += 1
    return total, count


def random_examples(seed: int, n: int = 4, prefix: int = 0) -> list[L.SFTExample]:
    g = torch.Generator().manual_seed(seed)
    common = torch.randint(3, 97, (prefix,), generator=g).tolist()
    out = []
    for i in range(n):
        np_, nt = int(torch.randint(2, 9, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        out.append(L.SFTExample(tuple(common + torch.randint(3, 97, (np_,), generator=g).tolist()),
                                tuple(torch.randint(3, 97, (nt,), generator=g).tolist())))
    return out


# eager attention takes its softmax in float32 even for float64 models: a padded row's softmax
# then rounds differently (~1e-7 relative); sdpa keeps float64, where only reduction order differs
TOL = {"sdpa": 1e-10, "eager": 1e-6}


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("gpt2", "sdpa"), ("phi3", "sdpa"), ("gemma2", "eager")])
def test_loss_is_target_only_cross_entropy(arch, attn):
    model = make_tiny(arch, dtype=torch.float64, seed=2, attn=attn)
    ex = random_examples(5, prefix=6)
    ref, count = reference_nll(model, ex)
    with torch.no_grad():
        for prefix in ((), ex[0].prompt_ids[:L.shared_prefix_len(ex)]):
            nll, n = L.sft_nll(model, ex, pad_id=0, prefix=prefix, padding_side="right")
            assert n == count
            assert abs(float(nll) - ref) <= TOL[attn] * abs(ref)
    assert L.shared_prefix_len(ex) == 6


def test_left_padding_and_labels():
    model = make_tiny("llama", dtype=torch.float64, seed=2, attn="sdpa")  # eager float64 NaNs on left pads
    ex = random_examples(7, prefix=4)
    ref, _ = reference_nll(model, ex)
    with torch.no_grad():
        for prefix in ((), ex[0].prompt_ids[:4]):
            nll, _ = L.sft_nll(model, ex, pad_id=0, prefix=prefix, padding_side="left")
            assert abs(float(nll) - ref) <= 1e-10 * abs(ref)  # float64, reduction order only
    for side in ("left", "right"):
        b = L.collate_sft(ex, pad_id=0, prefix_len=4, padding_side=side)
        for i, e in enumerate(ex):
            row = b.attention_mask[i].bool()
            seq = list(e.prompt_ids[4:]) + list(e.target_ids)
            assert b.input_ids[i][row].tolist() == seq
            assert b.position_ids[i][row].tolist() == list(range(4, 4 + len(seq)))
            lab = b.labels[i][row].tolist()
            assert lab == [-100] * (len(e.prompt_ids) - 4) + list(e.target_ids)  # prompt masked
            assert (b.labels[i][~row] == -100).all()  # pads masked


# Llama's RMSNorm runs in float32 inside a float64 model, and so does the gradient through it:
# the prefix's gradient, summed over rows before that cast, rounds differently from per-row
# gradients (~1e-8 relative). GPT-2 (LayerNorm in float64) shows pure reduction-order agreement.
GRAD_RTOL = {"gpt2": 1e-10, "llama": 1e-6}


@pytest.mark.parametrize("arch", sorted(GRAD_RTOL))
def test_shared_prefix_gives_the_same_gradients(arch):
    peft = pytest.importorskip("peft")
    model = make_tiny(arch, dtype=torch.float64, seed=4, attn="sdpa")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=L.default_target_modules(model),
                                                    fan_in_fan_out=arch == "gpt2"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))  # B = 0 would zero A's gradient
    ex = random_examples(9, n=3, prefix=5)
    grads = []
    for prefix in ((), ex[0].prompt_ids[:5]):
        pm.zero_grad()
        L.sft_nll(model, ex, pad_id=0, prefix=prefix)[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n, g in grads[0].items():
        assert (grads[1][n] - g).abs().max() <= GRAD_RTOL[arch] * g.abs().max(), n
    assert any(g.abs().max() > 0 for n, g in grads[0].items() if "lora_A" in n)


# ---- training ---------------------------------------------------------------------------------
def plain_state(model: nn.Module) -> dict:
    return {"class": type(model), "modules": [(n, id(m), type(m)) for n, m in model.named_modules()],
            "attrs": set(vars(model)), "flags": {n: p.requires_grad for n, p in model.named_parameters()},
            "training": model.training}


def test_training_lowers_the_loss_and_leaves_a_plain_model():
    pytest.importorskip("peft")
    tok, model = char_tokenizer(), make_tiny("llama", dtype=torch.float32, seed=1)
    model.train()
    before, weights = plain_state(model), snapshot(model)
    ps = problems(6)
    ex = L.build_sft_examples(ps, tok, PROMPT)
    with torch.no_grad():
        loss0 = float(L.sft_nll(model, ex)[0]) / sum(len(e.target_ids) for e in ex)
    cfg = L.LoRAConfig(epochs=3, lr=1e-2, batch_size=3, micro_batch_size=2, dropout=0.0)
    res = L.train_lora(model, tok, ps, PROMPT, cfg, progress=False)
    assert plain_state(model) == before
    assert all(bit_equal(p, weights[n]) for n, p in model.named_parameters())  # base untouched
    losses = [h["train_loss"] for h in res.history[1:]]
    assert losses[-1] < losses[0] and res.best_epoch == 3  # no validate: the last epoch is kept
    with L.merge_lora(model, res), torch.no_grad():
        loss3 = float(L.sft_nll(model, ex)[0]) / sum(len(e.target_ids) for e in ex)
    assert loss3 < 0.8 * loss0, (loss0, loss3)
    assert all(bit_equal(p, weights[n]) for n, p in model.named_parameters())  # restored on exit


def test_seeded_training_is_reproducible():
    pytest.importorskip("peft")
    tok, ps = char_tokenizer(), problems(4)
    cfg = L.LoRAConfig(epochs=1, lr=1e-2, batch_size=2)
    model = make_tiny("llama", dtype=torch.float32, seed=1)  # (its construction draws from the global RNG)
    state = torch.random.get_rng_state()
    a = L.train_lora(model, tok, ps, PROMPT, cfg, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    b = L.train_lora(make_tiny("llama", dtype=torch.float32, seed=1), tok, ps, PROMPT, cfg, progress=False)
    assert a.weights.keys() == b.weights.keys() and all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_merged_logits_equal_peft_logits_and_restore_is_bit_exact(arch, tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    monkeypatch.setitem(CONFIGS["gpt2"], "n_positions", 512)  # one character per token: prompts are long
    tok, model = char_tokenizer(), make_tiny(arch, dtype=torch.float64, seed=3, attn="sdpa")
    res = L.train_lora(model, tok, problems(4), PROMPT, L.LoRAConfig(epochs=1, lr=5e-2, batch_size=2, r=4),
                       progress=False)
    assert all(v.abs().max() > 0 for k, v in res.weights.items() if "lora_B" in k)  # a non-trivial adapter
    res.save(tmp_path / "adapter")
    x = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    base = snapshot(model)
    with torch.no_grad():
        h = L.merge_lora(model, L.load_lora(tmp_path / "adapter"))
        merged = model(x).logits
        changed = {n for n, p in model.named_parameters() if not bit_equal(p, base[n])}
        h.restore()
        assert all(bit_equal(p, base[n]) for n, p in model.named_parameters())
        assert changed == {f"{m}.weight" for m in L.module_names(res.weights)}
        pm = peft.PeftModel.from_pretrained(model, str(tmp_path / "adapter"))  # the peft way
        ref = pm(input_ids=x).logits
        pm.unload()
    # float64: x @ (W + s B A) vs x @ W + s (x @ A) @ B differ by reduction order only
    assert torch.allclose(merged, ref, rtol=1e-10, atol=1e-10)
    assert (merged - model(x).logits).abs().max() > 1e-3  # the adapter does change the logits


def test_trainable_parameter_count_formula():
    pytest.importorskip("peft")
    from transformers.pytorch_utils import Conv1D

    names = {"llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
             "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}, "gpt2": {"c_attn", "c_proj", "c_fc"}}
    for arch, targets in names.items():
        model = make_tiny(arch, dtype=torch.float32)
        expected = 0
        for n, m in model.named_modules():
            if n.split(".")[-1] in targets:
                fan_in, fan_out = m.weight.shape if isinstance(m, Conv1D) else m.weight.shape[::-1]
                expected += 16 * (fan_in + fan_out)
        res = L.train_lora(model, char_tokenizer(), problems(2), PROMPT, L.LoRAConfig(epochs=0), progress=False)
        assert res.n_trainable_params == expected > 0
        assert sum(v.numel() for v in res.weights.values()) == expected
        assert res.trainable_fraction == expected / sum(p.numel() for p in model.parameters())


def test_validation_keeps_the_best_epoch():
    pytest.importorskip("peft")
    tok, model = char_tokenizer(), make_tiny("llama", dtype=torch.float32, seed=5)
    scores, seen, logits = iter([0.2, 0.5, 0.4, 0.5]), [], []
    probe = "model.layers.1.self_attn.q_proj.weight"
    x = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))

    def validate(m):
        assert not m.training and not torch.is_grad_enabled()
        seen.append(m.get_parameter(probe.replace("q_proj.", "q_proj.base_layer.")).detach().clone())
        logits.append(m(x).logits)
        return next(scores)

    res = L.train_lora(model, tok, problems(4), PROMPT, L.LoRAConfig(epochs=3, lr=1e-2, batch_size=2),
                       validate=validate, progress=False)
    assert [h["val"] for h in res.history] == [0.2, 0.5, 0.4, 0.5] and [h["epoch"] for h in res.history] == [0, 1, 2, 3]
    assert (res.best_epoch, res.best_val) == (1, 0.5)  # the first of equal best scores
    assert not torch.equal(seen[1], seen[3])
    with L.merge_lora(model, res), torch.no_grad():  # the kept adapter is the one validated at epoch 1
        assert bit_equal(model.get_parameter(probe).detach(), seen[1])
        # validation saw exactly the merged model (the unmerged adapter was off, not added twice)
        assert bit_equal(model(x).logits, logits[1])


def test_save_load_roundtrip(tmp_path):
    pytest.importorskip("peft")
    res = L.train_lora(make_tiny("llama", dtype=torch.float32), char_tokenizer(), problems(2), PROMPT,
                       L.LoRAConfig(epochs=1, batch_size=2), validate=lambda m: 0.25, progress=False)
    d = res.save(tmp_path / "a")
    assert sorted(p.name for p in d.iterdir()) == [L.ADAPTER_CONFIG_NAME, L.ADAPTER_WEIGHTS_NAME, L.RESULT_NAME]
    cfg = json.loads((d / L.ADAPTER_CONFIG_NAME).read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 16, 32.0)
    back = L.load_lora(d)
    assert back.weights.keys() == res.weights.keys()
    assert all(bit_equal(back.weights[k], res.weights[k]) for k in res.weights)
    assert (back.scaling, back.best_epoch, back.best_val, back.history) == (2.0, 0, 0.25, res.history)
    with pytest.raises(CCAError, match="adapter_config.json"):
        L.load_lora(tmp_path / "missing")
    other = make_tiny("llama", dtype=torch.float32)
    other.model.layers = other.model.layers[:1]
    with pytest.raises(CCAError, match="lacks"):
        L.merge_lora(other, back)


def test_missing_peft_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(CCAError, match="pip install peft"):
        L.train_lora(make_tiny("llama"), char_tokenizer(), problems(1), PROMPT, progress=False)


def test_import_does_not_need_peft():
    code = ("import sys; sys.modules['peft'] = None; import cca_fast, cca_fast.baselines.lora.train; "
            "assert cca_fast.baselines.lora.train.LoRAConfig().scaling == 2.0")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
