"""Models, tokenizers, data and checks shared by several test modules (test modules import from
here, never from one another; fixtures built on these live in ``conftest.py``)."""
from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path
from types import ModuleType

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from cca_fast.delta import bitwise_equal
from cca_fast.experiments.pipeline import RunConfig
from cca_fast.stages.examples import PivotExample


def run_cli(command: ModuleType, argv: list[str]) -> int:
    """Run one ``cca`` subcommand module (``cca_fast.cli.common.<name>``) on ``argv``."""
    parser = argparse.ArgumentParser(prog="cca")
    command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def assert_only_owned_rows_may_differ(params: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                                      owned: dict) -> None:
    """Every parameter not in ``owned`` (``ComponentSpace.owned_rows``) and every row of an owned
    parameter outside its selected rows is bit-identical to ``base``."""
    for name, p in params.items():
        p = p.detach()
        if name not in owned:
            assert bitwise_equal(p, base[name]), f"{name} changed"
            continue
        s = owned[name]
        keep = torch.ones(p.shape[s.dim], dtype=torch.bool)
        keep[s.index.cpu()] = False
        other = keep.nonzero().flatten().to(p.device)
        assert bitwise_equal(p.index_select(s.dim, other), base[name].index_select(s.dim, other)), name


# ---------------------------------------------------------------- tiny models
# Tiny randomly initialised models of every supported family, built from configs (no download).
# Shapes are deliberately odd (6 query heads in 2 GQA groups, head_dim 6 (RoPE needs it even),
# d_ff 22) so slicing bugs show.

VOCAB = 97

COMMON = dict(vocab_size=VOCAB, hidden_size=36, intermediate_size=22, num_hidden_layers=2,
              num_attention_heads=6, num_key_value_heads=2, head_dim=6, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

CONFIGS: dict[str, dict] = {
    "llama": dict(COMMON),
    "mistral": dict(COMMON, sliding_window=None),
    "qwen2": dict(COMMON),
    "qwen3": dict(COMMON),
    "gemma2": dict(COMMON, query_pre_attn_scalar=6, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(COMMON, query_pre_attn_scalar=6),
    "olmo2": dict(COMMON),
    "phi3": dict(COMMON, head_dim=None),  # head_dim = hidden / heads = 6; GQA, 2 KV groups
    "gpt2": dict(vocab_size=VOCAB, n_embd=36, n_layer=2, n_head=6, n_positions=64, n_inner=22,
                 bos_token_id=1, eos_token_id=2),
}
ARCHS = sorted(CONFIGS)


def make_tiny(model_type: str, dtype: torch.dtype = torch.float64, seed: int = 0, attn: str = "eager"):
    """A tiny ``model_type`` causal LM in eval mode, weights from ``seed`` (also biases, so that
    bias handling is exercised)."""
    cfg = AutoConfig.for_model(model_type, **{k: v for k, v in CONFIGS[model_type].items() if v is not None})
    if model_type == "qwen2":
        pass  # qwen2 has q/k/v biases by default
    g = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
    return model.eval()


def make_biased_tiny(tokenizer) -> torch.nn.Module:
    """The tiny float32 llama of the pipeline tests, its LM head biased toward "0", "1" and " " of
    ``tokenizer`` (a char-level tokenizer): with gold answers 0 or 1 its greedy and sampled traces
    are sometimes right and sometimes wrong, so stage 1 finds flipped pairs and pivots."""
    model = make_tiny("llama", dtype=torch.float32, seed=0, attn="sdpa")
    model.config.max_position_embeddings = 2048
    with torch.no_grad():
        h = model.model(torch.randint(4, 79, (8, 40), generator=torch.Generator().manual_seed(0))).last_hidden_state
        h = h.reshape(-1, model.config.hidden_size)
        v = h.mean(0) / h.mean(0).norm() * 12.0 / h.norm(dim=-1).mean()
        g = torch.Generator().manual_seed(1)
        for c in ("0", "1", " "):
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(c)] = v + 0.3 * torch.randn(v.shape, generator=g)
    return model


# ---------------------------------------------------------------- stage-2 (localize) examples

def tiny(arch: str, dtype: torch.dtype = torch.float64, seed: int = 0):
    """A tiny model; SDPA attention except Gemma-2 (eager only). Eager attention in float64
    turns fully masked (left-padding) rows into NaN, so Gemma-2 gets equal-length examples."""
    return make_tiny(arch, dtype=dtype, seed=seed, attn="eager" if arch == "gemma2" else "sdpa")


def examples(arch: str, n: int = 5, seed: int = 0, min_len: int = 2, max_len: int = 9) -> list[PivotExample]:
    """``n`` examples with prefixes of different lengths (same length for Gemma-2)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 if arch == "gemma2" else int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        d, u = torch.randint(3, VOCAB, (2,), generator=g).tolist()
        out.append(PivotExample(f"p{i}", tuple(ids), d, u if u != d else (d + 1) % VOCAB))
    return out


# ---------------------------------------------------------------- tokenizers, the real default model

CHARS = list("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,:?'$-*+=/\n")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (ids 4..78), specials 0-3; fits the tiny models' 97-token vocab."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def smol_dir() -> str:
    """The real default model: ``$CCA_SMOL_DIR`` (a local copy, e.g. from ``save_pretrained``) if
    set, else the converted embedded GGUF."""
    local = os.environ.get("CCA_SMOL_DIR")
    if local and (Path(local) / "config.json").exists():
        return local
    from cca_fast.models.loading import cached_gguf_dir, default_gguf_path
    return str(cached_gguf_dir(default_gguf_path())[0])


# ---------------------------------------------------------------- scripted stand-in LM

def prompt_key(ids) -> int:
    """A hash of a whole token sequence (identifies a prompt inside :class:`ScriptedLM`)."""
    return sum((i + 1) * int(t) for i, t in enumerate(ids)) % 1_000_003


class ScriptedLM(torch.nn.Module):
    """A stand-in LM that emits a fixed script per prompt (keyed by :func:`prompt_key` of the
    prompt), through a real ``DynamicCache``: the row key is stored as the cached "key" value, so
    row selection goes through the cache API. Use with ``share_prefix=False`` (a prompt must
    arrive in one prefill). Records the batch size of every forward."""

    def __init__(self, scripts: dict[int, tuple[int, list[int]]], vocab: int = VOCAB):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config = None
        self.scripts, self.vocab, self.batch_sizes = scripts, vocab, []

    def forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache=True, logits_to_keep=1):
        B, S = input_ids.shape
        self.batch_sizes.append(B)
        if past_key_values.get_seq_length() == 0:
            key = torch.tensor([float(prompt_key(input_ids[r][attention_mask[r].bool()].tolist())) for r in range(B)],
                               dtype=torch.float64)
        else:
            key = past_key_values.layers[0].keys[:, 0, -1, 0]
        kv = key.view(B, 1, 1, 1).expand(B, 1, S, 1).contiguous()
        past_key_values.update(kv, kv.clone(), 0)
        logits = torch.full((B, 1, self.vocab), -5.0)
        for r in range(B):
            plen, script = self.scripts[int(key[r])]
            k = int(position_ids[r, -1]) + 1 - plen
            logits[r, 0, script[k] if k < len(script) else 4] = 5.0
        return type("Out", (), {"logits": logits, "past_key_values": past_key_values})()


def scripts_for(prompt_ids: list[list[int]], output_ids: list[list[int]]) -> dict[int, tuple[int, list[int]]]:
    return {prompt_key(p): (len(p), list(o)) for p, o in zip(prompt_ids, output_ids)}


# ---------------------------------------------------------------- suite files

MMLU_HEADER = "question,choice0,choice1,choice2,choice3,answer\n"


def write_mmlu(root: Path, sizes: dict[str, int]) -> None:
    """Synthetic MMLU: 5 dev rows and ``sizes[subject]`` test rows per subject."""
    for split in ("dev", "test"):
        (root / "mmlu" / split).mkdir(parents=True, exist_ok=True)
    for s, n in sizes.items():
        dev = "".join(f"{s} dev q{i}?,d{i}a,d{i}b,d{i}c,d{i}d,{i % 4}\n" for i in range(5))
        test = "".join(f"{s} test q{i}?,t{i}a,t{i}b,t{i}c,t{i}d,{(i + 1) % 4}\n" for i in range(n))
        (root / "mmlu" / "dev" / f"{s}_dev.csv").write_text(MMLU_HEADER + dev)
        (root / "mmlu" / "test" / f"{s}_test.csv").write_text(MMLU_HEADER + test)


TQA = ("Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
       'Adversarial,Misc,Is the sky green?,No it is blue,No; Blue,"Yes it is green; It is red;  ; Green ",s\n'
       "Adversarial,Misc,What is 2+2?,Four,4,Five; Three,s\n"
       "Adversarial,Misc,Tie question?,Tie best,x,Tie wrong,s\n")


# ---------------------------------------------------------------- the end-to-end pipeline's tiny run

def make_pipeline_workdir(d: Path) -> Path:
    """The tiny biased llama (char-level tokenizer, ``save_pretrained``) in ``d/model``, 40 problems
    whose gold answers are 0 or 1 in ``d/data.jsonl`` and one shot in ``d/shots.json`` (see
    test_pipeline.py's docstring)."""
    tok = char_tokenizer()
    model = make_biased_tiny(tok)
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    rows = [{"id": f"t{t}-{i}", "question": f"What is {t} {i}?", "answer": f"#### {(i + t) % 2}",
             "gold": (i + t) % 2, "template": f"t{t}"} for t in range(4) for i in range(10)]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "shots.json").write_text(json.dumps([{"question": "What is 1?", "target": "The final answer is 1."}]))
    return d


def run_config(d: Path, out: Path, **kw) -> RunConfig:
    """The pipeline tests' small run of the tiny model in ``d`` (:func:`make_pipeline_workdir`),
    written to ``out``; ``kw`` overrides fields."""
    from cca_fast.evaluation.prompting import PromptConfig
    from cca_fast.experiments.config import GenerationSettings
    from cca_fast.stages.localize.dcm import DCMConfig
    from cca_fast.stages.update import UpdateConfig

    cfg = dict(output=str(out), model=str(d / "model"), dtype="float32", device="cpu", data=str(d / "data.jsonl"),
               prompt=PromptConfig(exemplars=str(d / "shots.json"), n_shots=1), weak_threshold=1.01,
               max_train_problems=None, generation=GenerationSettings(max_new_tokens=12, batch_size=8),
               dcm=DCMConfig(epochs=4, lambda_l1=0.01), update=UpdateConfig(max_steps=4, lr=1e-2))
    cfg.update(kw)
    return RunConfig(**cfg)


def run_argv(d: Path, out: Path, *extra: str) -> list[str]:
    """``cca run`` arguments of the pipeline tests' small run (the flags of :func:`run_config`) of
    the tiny model in ``d`` (:func:`make_pipeline_workdir`), written to ``out``; ``extra`` appended.
    ``--recipe paper`` (``RunConfig()``, as :func:`run_config`) unless ``extra`` names another."""
    return ["run", "--recipe", "paper", "--model", str(d / "model"), "--dtype", "float32", "--device", "cpu", "--data",
            str(d / "data.jsonl"), "--shots", str(d / "shots.json"), "--n-shots", "1", "--weak-threshold", "1.01",
            "--max-train-problems", "0", "--max-new-tokens", "12", "--batch-size", "8", "--dcm-epochs", "4",
            "--dcm-lambda", "0.01", "--update-steps", "4", "--lr", "1e-2", "--output", str(out), "--quiet", *extra]


# ---------------------------------------------------------------- compile-only kernel checks

def compile_counts(script: str) -> dict:
    """Run ``script`` (it compiles kernels for a GPU target and prints a JSON dict last) in a child
    Python without ``TRITON_INTERPRET`` and with FP fusion on; the parsed dict. Skips the test
    when this Triton has no compiler backends."""
    import os
    import subprocess
    import sys

    import pytest

    pytest.importorskip("triton.backends.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- a small sparse delta

def make_delta(components=(0, 7)):
    """``(base, new, delta)``: two float32 tiny llamas whose ``components`` rows differ by 0.01,
    and the :class:`~cca_fast.delta.SparseDelta` between them."""
    from cca_fast import ComponentSpace
    from cca_fast.delta import SparseDelta

    base, new = make_tiny("llama", dtype=torch.float32), make_tiny("llama", dtype=torch.float32)
    with torch.no_grad():
        for name, sel in ComponentSpace(new).owned_rows(list(components)).items():
            p = new.get_parameter(name)
            p.index_copy_(sel.dim, sel.index, p.index_select(sel.dim, sel.index) + 0.01)
    return base, new, SparseDelta.from_models(base, new)


def save_model_dir(model, tokenizer, path):
    """Save ``model`` and ``tokenizer`` into the folder ``path`` (``save_pretrained``); returns it."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_suite_data(root: Path) -> Path:
    """Minimal suite files in the layout of ../shared/data (two MMLU subjects, 3 TruthfulQA
    questions, 3 GSM8K solutions)."""
    for split, n in (("dev", 5), ("test", 3)):
        d = root / "mmlu" / split
        d.mkdir(parents=True)
        for subj in ("alpha_beta", "gamma"):
            with open(d / f"{subj}_{split}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
                for i in range(n):
                    w.writerow([f"{subj} question {i}?", "0", "1", "10", "11", i % 4])
    (root / "truthfulqa").mkdir()
    with open(root / "truthfulqa" / "TruthfulQA.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"])
        for i in range(3):
            w.writerow(["A", "B", f"What is {i}?", "1 0", "1 0; 10", "0 1; 11", "x"])
    (root / "gsm8k").mkdir()
    (root / "gsm8k" / "test.jsonl").write_text("".join(
        json.dumps({"question": f"What is {i} 1?", "answer": f"1 0 <<1=1>> 1\n#### {i}"}) + "\n" for i in range(3)))
    return root
