"""Supervised fine-tuning on gold solutions: the data and the loss of the method's ``gold_nll``
objective (stage 3, :mod:`cca_fast.stages.objectives`), shared by the LoRA baseline
(:mod:`cca_fast.baselines.lora.train`).

A training sequence is the evaluation prompt (:func:`cca_fast.evaluation.prompting.build_prompt`) followed by
the problem's GSM8K solution in the exemplar style (:func:`gold_target`). The loss
(:func:`sft_nll`) is the next-token cross-entropy of the *target tokens only*: prompt and pad
positions carry the label ``-100``.

Shared prefix: every sequence starts with the same few-shot exemplars (811 of ~885 tokens with the
paper's 8-shot prompt and SmolLM2's tokenizer), so :func:`sft_nll` can run that prefix once (batch
1, with gradients) and expand its KV cache to the batch; each row's own suffix (question +
target) follows it, padded. The loss and its gradients are those of running every row in full.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import nn

from cca_fast.data.problem import Problem
from cca_fast.errors import CCAError, DataError
from cca_fast.generation.batching import Padded, pad, run_suffixes
from cca_fast.generation.prefix import on_shared_prefix, shared_len
from cca_fast.models import runtime
from cca_fast.evaluation.prompting import _GOLD_RE, ANSWER_PREFIX, PromptConfig, build_prompt, encode_prompts

_CALC_RE = re.compile(r"<<[^<>]*>>")


# ---- the training target ------------------------------------------------------------------------
def gold_target(problem: Problem | str) -> str:
    """The GSM8K solution in the exemplar style: ``<<...>>`` calculator annotations removed, the
    lines joined with spaces (runs of blanks become one space), ``#### N`` replaced by
    ``The final answer is N.`` (commas and a ``$`` dropped from N).

    Raises:
        DataError: no solution text, or no ``#### N`` in it.
    """
    text = problem.answer if isinstance(problem, Problem) else str(problem)
    where = f"problem {problem.id!r}" if isinstance(problem, Problem) else "solution text"
    if not text.strip():
        raise DataError(f"{where} has no solution text ('answer'); LoRA trains on gold solutions")
    body, sep, final = text.rpartition("####")
    m = _GOLD_RE.search(sep + final)
    if not sep or not m:
        raise DataError(f"{where}: no '#### <number>' line in its solution {text[-60:]!r}")
    lines = [" ".join(ln.split()) for ln in _CALC_RE.sub("", body).splitlines()]
    steps = " ".join(ln for ln in lines if ln)
    answer = f"The final answer is {m.group(1).replace(',', '')}."
    return f"{steps} {answer}" if steps else answer


def target_text(problem: Problem, prompt: PromptConfig) -> str:
    """What follows the prompt: ``" " + gold_target`` (plain prompts end with ``step by step.``),
    or ``"Let's think step by step. " + gold_target`` as the assistant turn in chat mode."""
    return f"{ANSWER_PREFIX} {gold_target(problem)}" if prompt.mode == "chat" else " " + gold_target(problem)


@dataclass(frozen=True)
class SFTExample:
    """Token ids of one training sequence: ``prompt_ids`` (no loss) then ``target_ids`` (loss)."""

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    id: str = ""


def build_sft_examples(problems: Sequence[Problem], tokenizer: Any, prompt: PromptConfig) -> list[SFTExample]:
    """Tokenise ``prompt + target`` for each problem. The target tokens are those of the joint
    text after the prompt's own tokens (what the model would generate after the evaluation
    prompt); if the joint tokenisation does not start with the prompt's, the target is
    tokenised alone and appended."""
    prompts = [build_prompt(p.question, prompt, tokenizer) for p in problems]
    targets = [target_text(p, prompt) for p in problems]
    p_ids = encode_prompts(prompts, tokenizer, prompt)
    full = encode_prompts([a + b for a, b in zip(prompts, targets)], tokenizer, prompt)
    out = []
    for prob, pi, fi, t in zip(problems, p_ids, full, targets):
        if fi[: len(pi)] == pi and len(fi) > len(pi):
            ti = fi[len(pi):]
        else:
            ti = list(tokenizer(t, add_special_tokens=False)["input_ids"])
        if not pi or not ti:
            raise DataError(f"problem {prob.id!r}: empty prompt or target after tokenisation")
        out.append(SFTExample(tuple(pi), tuple(ti), prob.id))
    return out


# ---- batches and the loss -----------------------------------------------------------------------
@dataclass
class SFTBatch:
    """Padded rows (after a shared prefix of ``prefix_len`` tokens, if any).

    Attributes:
        input_ids, attention_mask, position_ids, labels: ``LongTensor [B, S]``; ``labels`` is the
            token id at target positions and ``-100`` at prompt and pad positions (a label sits at
            the position of its token; the logits of position ``t`` predict label ``t + 1``).
        prefix_len: ``P``, the shared prefix length; positions count from ``P``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    prefix_len: int = 0


def collate_sft(examples: Sequence[SFTExample], pad_id: int, *, prefix_len: int = 0,
                padding_side: Literal["right", "left"] = "right", device: torch.device | str = "cpu") -> SFTBatch:
    """Pad ``examples[i].prompt_ids[prefix_len:] + target_ids`` into an :class:`SFTBatch`."""
    if not examples:
        raise CCAError("collate_sft needs at least one example")
    if padding_side not in ("right", "left"):
        raise CCAError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    seqs = [list(e.prompt_ids[prefix_len:]) + list(e.target_ids) for e in examples]
    if any(len(e.prompt_ids) - prefix_len < 1 for e in examples):
        raise CCAError("the shared prefix must leave at least one prompt token in every row")
    b = pad(seqs, pad_id, side=padding_side, offset=prefix_len)
    labels = torch.full(b.input_ids.shape, -100, dtype=torch.long)
    for i, (e, s, o) in enumerate(zip(examples, seqs, b.starts)):
        labels[i, o + len(s) - len(e.target_ids):o + len(s)] = torch.tensor(e.target_ids)
    return SFTBatch(b.input_ids.to(device), b.attention_mask.to(device), b.position_ids.to(device), labels.to(device),
                    prefix_len)


def shared_prefix_len(examples: Sequence[SFTExample]) -> int:
    """Longest common prompt prefix, leaving at least one prompt token per row."""
    return shared_len([e.prompt_ids for e in examples])


def sft_nll(model: nn.Module, examples: Sequence[SFTExample], *, pad_id: int = 0,
            prefix: Sequence[int] = (), padding_side: Literal["right", "left"] = "right") -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood of the target tokens of ``examples`` and their
    count (mean loss = ``nll / count``). With ``prefix`` (a common prompt prefix of every example,
    see :func:`shared_prefix_len`) the prefix runs once and its KV cache is expanded to the batch.

    Returns:
        ``(nll, n_tokens)``: a scalar tensor (float32, or float64 for a float64 model; it carries
        the autograd graph when gradients are enabled) and an int.
    """
    device = runtime.input_device(model)
    P = len(prefix)
    batch = collate_sft(examples, pad_id, prefix_len=P, padding_side=padding_side, device=device)
    S = batch.input_ids.shape[1]
    rows = Padded(batch.input_ids, batch.attention_mask, batch.position_ids, [])
    valid = batch.labels[:, 1:] != -100  # [B, S-1]: logits at t predict the label at t + 1
    lo = int(valid.any(0).nonzero()[0])
    if P:
        logits = on_shared_prefix(model, prefix, rows, keep=S - lo)
    else:
        logits = run_suffixes(model, rows, keep=S - lo)[0]
    logits = logits[:, :-1]  # positions lo .. S-2
    if logits.dtype != torch.float64:
        logits = logits.float()
    nll = nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels[:, lo + 1:].flatten(),
                                      ignore_index=-100, reduction="sum")
    return nll, int(valid.sum())

