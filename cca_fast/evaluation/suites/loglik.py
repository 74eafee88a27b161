"""Batched continuation log-likelihood, scored the way lm-eval-harness scores it.

For a pair ``(context, continuation)`` (lm-eval's ``HFLM._encode_pair``):

* trailing whitespace of the context moves to the front of the continuation
  (``"Answer: " + "A"`` is scored as ``"Answer:" + " A"``);
* ``whole = encode(context + continuation)``, ``ctx = encode(context)``, and the continuation's
  tokens are ``whole[len(ctx):]`` (so a BPE merge across the boundary is kept as in lm-eval);
* an empty context is replaced by one prefix token (BOS, else EOS), as lm-eval does;
* tokens are encoded without special tokens by default (lm-eval's default for causal LMs
  without ``add_bos_token``).

The score is ``sum_j log p(cont_j | ctx, cont_<j)``. The model sees ``(ctx + cont)[:-1]``
(left-truncated to ``max_length`` tokens, as lm-eval does) and the log-softmax of the last
``len(cont)`` positions is gathered. Only those positions get logits (``logits_to_keep``), so
the ``[B, T, V]`` logits tensor is never built.

Batching: requests with the same model input (the 4 answer letters of an MMLU question) share
one row; rows are left padded (position ids count real tokens, pads are masked, so every row
computes what it would compute alone, up to floating point reduction order). With
``share_prefix`` the rows are sorted so that rows with a long common token prefix (the same
few-shot exemplars) share a batch, the prefix is run once and its KV cache copied into every row
of the batch (and kept for the next batch when it has the same prefix).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from cca_fast.errors import CCAError
from cca_fast.generation.batching import pad, run_suffixes
from cca_fast.generation.prefix import can_share, common_prefix_len, shared_len
from cca_fast.generation.state import DecodeState, prefill
from cca_fast.models import runtime

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class LoglikConfig:
    """How to score.

    Attributes:
        batch_size: distinct model inputs per forward pass.
        logprob_dtype: dtype of the log-softmax, ``"float32"`` (default) or ``"float64"``; a
            float64 model always gets float64. Logits are upcast before the log-softmax.
        add_special_tokens: encode with the tokenizer's special tokens (a BOS, for tokenizers
            that add one); lm-eval's default for causal LMs is no special tokens.
        max_length: longest model input; longer inputs lose tokens on the left (lm-eval's rule).
            Default: the model config's ``max_position_embeddings`` (no limit when absent).
        share_prefix: compute a token prefix common to a batch once (see the module doc).
        min_shared_prefix: shortest common prefix worth sharing, in tokens.
        progress: show a tqdm bar over batches.
    """

    batch_size: int = 8
    logprob_dtype: str = "float32"
    add_special_tokens: bool = False
    max_length: int | None = None
    share_prefix: bool = True
    min_shared_prefix: int = 32
    progress: bool = False

    def __post_init__(self) -> None:
        from cca_fast import checks

        checks.positive("batch_size", self.batch_size)
        if str(self.logprob_dtype).replace("torch.", "") not in _DTYPES:
            raise CCAError(f"logprob_dtype must be one of {sorted(_DTYPES)}, got {self.logprob_dtype!r}")
        if self.max_length is not None and self.max_length < 2:
            raise CCAError(f"max_length must be at least 2, got {self.max_length}")


@dataclass(frozen=True)
class Loglik:
    """Score of one request.

    Attributes:
        logprob: sum of the continuation tokens' log-probabilities (natural log).
        n_tokens: number of continuation tokens.
        greedy: every continuation token is the argmax of its position.
        truncated: context tokens dropped on the left to fit ``max_length`` (0 normally).
    """

    logprob: float
    n_tokens: int
    greedy: bool
    truncated: int = 0


@dataclass
class LoglikStats:
    """Work counters (accumulated over calls when the same object is passed again).

    Attributes:
        requests: requests scored.
        rows: distinct model inputs run (requests with the same input share a row).
        batches: forward passes over suffixes.
        input_tokens: token slots run through the model, pads included, prefixes once each.
        prefix_tokens: tokens of shared prefixes (counted once per prefix computation).
        shared_batches: batches that continued from a shared prefix.
    """

    requests: int = 0
    rows: int = 0
    batches: int = 0
    input_tokens: int = 0
    prefix_tokens: int = 0
    shared_batches: int = 0


def prefix_token_id(tokenizer: Any) -> int:
    """The token that stands in for an empty context: BOS, else EOS (lm-eval's rule)."""
    for name in ("bos_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return v
    raise CCAError("an empty context needs a BOS or EOS token, and the tokenizer has neither; "
                   "give every request a non-empty context")


def encode_pair(tokenizer: Any, context: str, continuation: str, *,
                add_special_tokens: bool = False) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` as lm-eval-harness tokenises a causal LM request.

    Raises:
        CCAError: the continuation encodes to no token.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if context == "":
        ctx = [prefix_token_id(tokenizer)]
        cont = list(tokenizer(continuation, add_special_tokens=add_special_tokens)["input_ids"])
    else:
        whole = list(tokenizer(context + continuation, add_special_tokens=add_special_tokens)["input_ids"])
        ctx = list(tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"])
        cont = whole[len(ctx):]
    if not cont:
        raise CCAError(f"the continuation {continuation!r} (after context {context[-40:]!r}) encodes to no "
                       "token; every continuation must be non-empty")
    return ctx, cont


def loglikelihood(model: torch.nn.Module, tokenizer: Any, requests: Sequence[tuple[str, str]],
                  config: LoglikConfig | None = None, *, stats: LoglikStats | None = None) -> list[Loglik]:
    """Score text ``requests`` ``(context, continuation)``; one :class:`Loglik` each, in order."""
    config = config or LoglikConfig()
    pairs = [encode_pair(tokenizer, c, x, add_special_tokens=config.add_special_tokens) for c, x in requests]
    return loglikelihood_tokens(model, pairs, config, stats=stats)


@dataclass
class _Row:
    """One distinct model input and the requests read from it."""

    tokens: list[int]
    requests: list[tuple[int, list[int], int]]  # (request index, continuation ids, truncated)

    @property
    def need(self) -> int:
        """Positions (from the end) whose logits are needed."""
        return max(len(c) for _, c, _ in self.requests)


def _rows(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int | None) -> list[_Row]:
    rows: dict[tuple[int, ...], _Row] = {}
    for i, (ctx, cont) in enumerate(pairs):
        ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
        if not ctx or not cont:
            raise CCAError(f"request {i}: context and continuation must both have at least one token "
                           f"(got {len(ctx)} and {len(cont)})")
        full = ctx + cont
        cut = 0
        if max_length is not None and len(full) - 1 > max_length:
            if len(cont) > max_length:
                raise CCAError(f"request {i}: the continuation has {len(cont)} tokens, more than the model's "
                               f"max_length {max_length}")
            cut = len(full) - 1 - max_length
            full = full[cut:]
        key = tuple(full[:-1])
        row = rows.get(key)
        if row is None:
            row = rows[key] = _Row(list(key), [])
        row.requests.append((i, cont, cut))
    return list(rows.values())


def _batches(rows: list[_Row], config: LoglikConfig) -> list[list[_Row]]:
    """Longest-first fixed batches, or (``share_prefix``) lexicographic order cut so that rows
    with a long common prefix stay together."""
    bs = config.batch_size
    if not config.share_prefix:
        rows = sorted(rows, key=lambda r: -len(r.tokens))
        return [rows[i:i + bs] for i in range(0, len(rows), bs)]
    rows = sorted(rows, key=lambda r: r.tokens)
    m = config.min_shared_prefix
    adj = [common_prefix_len([a.tokens, b.tokens]) for a, b in zip(rows, rows[1:])]  # adj[i]: rows i, i+1
    out: list[list[_Row]] = []
    cur: list[_Row] = []
    cur_cp = 0
    for i, r in enumerate(rows):
        if cur:
            cp = min(cur_cp, adj[i - 1]) if len(cur) > 1 else adj[i - 1]
            starts_group = i + 1 < len(rows) and adj[i] >= m  # r shares a prefix with the next row
            if len(cur) >= bs:
                cut = True
            elif len(cur) == 1:  # a lone row takes r unless r begins a sharing group of its own
                cut = cp < m and starts_group
            elif cur_cp >= m:  # a sharing batch takes only rows that keep it sharing
                cut = cp < m
            else:  # a non-sharing batch fills up, but leaves a sharing group to itself
                cut = starts_group
            if not cut:
                cur.append(r)
                cur_cp = cp
                continue
            out.append(cur)
        cur, cur_cp = [r], 0
    if cur:
        out.append(cur)
    return out


def loglikelihood_tokens(model: torch.nn.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                         config: LoglikConfig | None = None, *, stats: LoglikStats | None = None) -> list[Loglik]:
    """Score token-id requests ``(context_ids, continuation_ids)``; one :class:`Loglik` each, in order.

    Runs under ``torch.no_grad()`` with the model in eval mode (its mode is restored after).
    Works on any device and dtype; inputs go to the input embedding's device.
    """
    config = config or LoglikConfig()
    max_length = config.max_length
    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    rows = _rows(pairs, max_length)
    batches = _batches(rows, config)
    stats = stats if stats is not None else LoglikStats()
    stats.requests += len(pairs)
    stats.rows += len(rows)
    device = runtime.input_device(model)
    want = _DTYPES[str(config.logprob_dtype).replace("torch.", "")]
    results: list[Loglik | None] = [None] * len(pairs)
    bar = None
    if config.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(pairs), desc="loglikelihood", unit="request")
    prefix_tokens: list[int] | None = None
    prefix_state: DecodeState | None = None
    try:
        with torch.no_grad(), runtime.eval_mode(model):
            for batch in batches:
                P = 0
                if config.share_prefix and len(batch) > 1:
                    # each row keeps its scored positions (r.need) out of the shared part
                    P = shared_len([r.tokens[:len(r.tokens) - r.need + 1] for r in batch], config.min_shared_prefix)
                    if P and not can_share(model, max(len(r.tokens) for r in batch)):
                        P = 0
                if P:
                    if prefix_tokens != batch[0].tokens[:P]:
                        prefix_tokens = batch[0].tokens[:P]
                        prefix_state = prefill(model, [prefix_tokens])
                        stats.prefix_tokens += P
                        stats.input_tokens += P
                    assert prefix_state is not None
                    base = prefix_state.repeat(len(batch))
                    stats.shared_batches += 1
                stats.batches += 1
                stats.input_tokens += len(batch) * max(len(r.tokens) - P for r in batch)
                logits = _run_batch(model, [r.tokens[P:] for r in batch], max(r.need for r in batch), device,
                                    base if P else None)
                lp_dtype = torch.float64 if logits.dtype == torch.float64 else want
                logp = logits.to(lp_dtype).log_softmax(-1)
                keep = logp.shape[1]
                for b, row in enumerate(batch):
                    for i, cont, cut in row.requests:
                        k = len(cont)
                        tgt = torch.tensor(cont, device=logp.device).unsqueeze(-1)
                        lp = logp[b, keep - k:, :]
                        tok_lp = lp.gather(-1, tgt).squeeze(-1)
                        greedy = bool((lp.argmax(-1) == tgt.squeeze(-1)).all())
                        results[i] = Loglik(float(tok_lp.double().sum()), k, greedy, cut)
                if bar is not None:
                    bar.update(sum(len(r.requests) for r in batch))
    finally:
        if bar is not None:
            bar.close()
    return [r for r in results if r is not None]


def _run_batch(model: torch.nn.Module, seqs: list[list[int]], keep: int, device: torch.device,
               prefix: DecodeState | None) -> torch.Tensor:
    """Left-pad ``seqs`` (after ``prefix`` when given) and return the last ``keep`` positions'
    logits ``[B, keep, V]``."""
    batch = pad(seqs, 0, offset=0 if prefix is None else prefix.next_position, device=device)
    if prefix is None and len(seqs) == 1:  # nothing to mask: let the attention take its causal fast path
        logits = runtime.forward(model, input_ids=batch.input_ids, position_ids=batch.position_ids, keep=keep)[0]
    else:
        logits = run_suffixes(model, batch, cache=None if prefix is None else prefix.cache,
                              prefix_mask=None if prefix is None else prefix.attention_mask, keep=keep)[0]
    if torch.isnan(logits).any():
        attn = getattr(getattr(model, "config", None), "_attn_implementation", "?")
        raise CCAError(f"the model produced NaN logits (dtype {logits.dtype}, attention {attn!r}); with padding this is "
                       "a known transformers problem of float64 + eager attention (fully masked pad rows): use sdpa "
                       "attention, another dtype, or batch_size=1")
    return logits


__all__ = ["LoglikConfig", "Loglik", "LoglikStats", "encode_pair", "loglikelihood", "loglikelihood_tokens",
           "prefix_token_id"]
