"""Batched generation with a KV cache, per-sequence stopping, greedy or seeded sampling.

Layers, from low to high:

* :func:`prefill` runs token sequences through the model into a :class:`DecodeState` (a
  ``DynamicCache``, the next-token logits, the attention mask, the next position ids). It can
  continue from another state (``prefix=``): a prompt prefix shared by many sequences (the
  few-shot exemplars) is then computed once and copied, not recomputed per row.
* :func:`decode` continues a :class:`DecodeState` token by token. A sequence that stops
  (answer sentence, EOS, new question, length) is *removed* from the running batch: its cache
  rows, mask row and logits row are dropped, so early finishers stop costing compute.
* :func:`generate` does it all for a list of prompts: sort by length, batch, share the common
  prefix, prefill, decode, restore the input order. With a
  :class:`~cca_fast.generation.prefix.PrefixCache` the common prefix also survives the call: the next
  call (another problem, the next validation batch, a branching completion) reuses it as far as
  its tokens match, while the weights stay unchanged.

Padding: rows are left padded; when a shared prefix is used, the padding of each row sits
between the prefix and the row's own suffix. Either way position ids count the real tokens of
each row from 0 (as Hugging Face ``generate`` does for left padding), and the 2-D attention mask
hides the pad slots, so each row computes what it would compute alone (up to floating point
reduction order).

Stopping is checked on the decoded text, incrementally: each step decodes only the new token
with a little context (enough to get SentencePiece spaces and multi-byte characters right) and
asks each rule of ``GenerationConfig.stops`` (:mod:`~cca_fast.generation.stops`, passed in by the
caller; decoding knows no prompt format) about the new text. A row stops at

* the first text stop (its rule's ``reason``; e.g. the paper's rules from
  :func:`cca_fast.evaluation.prompting.paper_stops`: ``"answer"`` keeps the answer sentence up to
  its dot, ``"new_question"`` ends the text before the next ``Q:``),
* an EOS token id (``"eos"``; the text excludes it): the tokenizer's, the model's generation
  config's and ``GenerationConfig.eos_token_ids``,
* otherwise ``max_new_tokens`` (``"length"``).

``GenerationConfig.early_stop=False`` is the reference procedure (the authors' code decodes
``max_new_tokens`` and cuts afterwards): a stopped row stays in the batch and decodes up to
``max_new_tokens`` tokens, which are thrown away; its output and text are cut at the first stop
exactly as with early stopping, so both give the same generations (more compute for the same
result; :attr:`GenerationStats.discarded_tokens` counts the waste).

``Generation.output_ids`` holds every generated token up to and including the one that
triggered the stop (so it may carry a few characters past the stop point, e.g. ``".\\n"`` or
``"\\nQ"``), ``Generation.text`` the decoded text cut at the stop point.

Sampling uses one CPU ``torch.Generator`` per row, seeded from ``GenerationConfig.seed`` and the
row's index in the prompt list, and inverse-CDF sampling from one uniform number per row and
step: the draws do not depend on the device, the batch size or which other rows share the batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from cca_fast.errors import CCAError
from cca_fast.generation.prefix import PrefixCache, can_share, shared_len
from cca_fast.generation.state import DecodeState, GenerationStats, prefill
from cca_fast.generation import slots
from cca_fast.generation.stops import StopRule
from cca_fast.models import runtime

TOKEN_REASONS = ("eos", "length")  # besides the reasons of the text stop rules
#: values of :attr:`GenerationConfig.compute_dtype`
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclass
class GenerationConfig:
    """Decoding settings.

    Attributes:
        max_new_tokens: at most this many new tokens per sequence (paper: 1500; the default is
            CPU-friendly and enough for GSM-style chains of thought).
        do_sample: ``False`` = greedy (paper default for evaluation).
        temperature: sampling temperature (> 0); ignored when greedy.
        top_p: nucleus sampling mass in ``(0, 1]``; 1 = off.
        top_k: keep only the ``top_k`` most likely tokens; 0 = off.
        seed: sampling seed; row ``i`` of the prompt list uses a generator seeded from
            ``(seed, i)``.
        batch_size: sequences decoded together (the padded-batch decoder's batch; the slot
            decoder's slot count when ``slots`` is 0).
        slots: the slot decoder's number of slots (``continuous``; 0 = ``batch_size``). A slot
            holds only its own key/values (the shared prefix is stored once), so many slots are
            cheap; see :attr:`rows`.
        stops: text stop rules (:mod:`~cca_fast.generation.stops`), e.g.
            :func:`cca_fast.evaluation.prompting.paper_stops`; none by default.
        stop_on_eos: stop at an EOS token.
        eos_token_ids: extra EOS ids (the tokenizer's and the model's are always included).
        share_prefix: prefill the prompts' longest common token prefix once and copy its cache.
        min_shared_prefix: only share a common prefix of at least this many tokens.
        early_stop: remove a row from the batch as soon as it stops. ``False`` (the reference
            procedure): every row decodes ``max_new_tokens`` tokens; the output is still cut at
            the first stop, so the result is the same.
        continuous: decode through :mod:`~cca_fast.generation.slots` (continuous batching over
            ``batch_size`` slots of a preallocated cache, the shared prefix stored once) where the
            model allows; ``False`` (or an unsupported model): padded batches of ``batch_size``
            prompts over a growing cache. Both give the same tokens up to floating-point
            reduction order.
        compute_dtype: ``"float32"`` (default): the forward runs in the model's own dtype, and the
            slot decoder's greedy tokens equal the batch-1 reference's. ``"bfloat16"`` (opt-in):
            the forward runs under ``torch.autocast(dtype=torch.bfloat16)`` on the model's device
            (matrix products in bf16, each weight cast once per call; norms, the attention
            softmax and the residual stream stay float32); not token-identical to float32. Its
            speed and token agreement with float32, measured on a 2-core CPU:
            ``bench/generation/results/bf16.md`` (1.24-1.5x faster); its accuracy:
            ``bench/generation/results/bf16_accuracy.md`` (on the embedded default, 680
            built-in test problems: 14.3% -> 12.5%, -1.8 points [-3.1, -0.4], 1.32x faster).
            Only generation: training and attribution never see it.
    """

    max_new_tokens: int = 400
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 8
    slots: int = 0
    stops: tuple[StopRule, ...] = ()
    stop_on_eos: bool = True
    eos_token_ids: tuple[int, ...] = ()
    share_prefix: bool = True
    min_shared_prefix: int = 16
    early_stop: bool = True
    continuous: bool = True
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_compute_dtype("GenerationConfig.compute_dtype", self.compute_dtype)
        self.eos_token_ids = tuple(int(t) for t in self.eos_token_ids)
        if self.max_new_tokens < 1:
            raise CCAError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise CCAError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.slots < 0:
            raise CCAError(f"slots must be >= 0 (0 = batch_size), got {self.slots}")
        if not self.temperature > 0:
            raise CCAError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise CCAError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise CCAError(f"top_k must be >= 0, got {self.top_k}")
        self.stops = tuple(self.stops)
        bad = [s for s in self.stops if not isinstance(s, StopRule)]
        if bad:
            raise CCAError(f"stops must be stop rules (cca_fast.generation.stops), got {bad[0]!r}")

    @property
    def rows(self) -> int:
        """Sequences decoded at once: ``slots`` (or ``batch_size`` when 0) with ``continuous``,
        else ``batch_size``. Callers that cut work into chunks size them by it."""
        return (self.slots or self.batch_size) if self.continuous else self.batch_size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["stops"] = [{"type": type(s).__name__, **asdict(s)} for s in self.stops]
        return d


def check_compute_dtype(field: str, value: Any, flag: str | None = None) -> None:
    """``value`` is one of :data:`COMPUTE_DTYPES`, else a :class:`~cca_fast.errors.CCAError`
    naming ``field`` (and the command-line ``flag``) and the allowed values."""
    if value not in COMPUTE_DTYPES:
        where = f"{field} ({flag})" if flag else field
        raise CCAError(f"{where} must be one of {', '.join(COMPUTE_DTYPES)}, got {value!r}; "
                       "float32 (the default) keeps the model's own dtype, bfloat16 runs generation's matrix "
                       "products in bf16 (opt-in, not token-identical)")


@contextlib.contextmanager
def compute_context(model: torch.nn.Module, compute_dtype: str) -> Iterator[None]:
    """The context generation's forwards run in: ``torch.autocast`` to bf16 on the model's device
    type for ``"bfloat16"``, a no-op for ``"float32"``.

    Autocast, not a bf16 copy of the weights (compared with a model cast to bf16 in
    ``bench/generation/bench_bf16.py``). Autocast casts a float32 weight once per block and reuses
    the cast (its cast cache), but only for weights that require grad: frozen float32 weights
    (validation inside the update stage, an adapter's base layers) are marked as requiring grad
    for the block, so that they too are cast once per call rather than at every forward, and
    restored after. No graph is built: generation runs under ``torch.no_grad``."""
    if compute_dtype == "float32":
        yield
        return
    frozen = [p for p in model.parameters() if not p.requires_grad and p.dtype == torch.float32 and p.is_leaf]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.autocast(runtime.input_device(model).type, dtype=torch.bfloat16):
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


@dataclass
class Generation:
    """One generated continuation.

    Attributes:
        prompt_ids: the prompt's token ids.
        output_ids: new tokens only, up to and including the token that triggered the stop.
        text: the decoded new tokens, cut at the stop point (``""`` without a tokenizer).
        prompt_len: ``len(prompt_ids)``.
        finish_reason: a text stop rule's reason (the paper's: ``"answer"``, ``"new_question"``), ``"eos"`` or
            ``"length"``.
        n_generated: ``len(output_ids)``.
    """

    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    prompt_len: int
    finish_reason: str
    n_generated: int


@dataclass
class DecodeResult:
    """What :func:`decode` returns per row: new tokens, why it stopped, and the text cut at the
    stop point."""

    output_ids: list[int]
    finish_reason: str
    text: str


def row_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for row ``index`` of a run seeded with ``seed`` (a fixed mixing
    function, so the same ``(seed, index)`` always draws the same numbers)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) % (1 << 64)
    x ^= x >> 29
    return x % (1 << 63)


# --------------------------------------------------------------------------------------------
# Token choice
# --------------------------------------------------------------------------------------------

def sample_from_logits(logits: torch.Tensor, uniforms: torch.Tensor, *, temperature: float | torch.Tensor = 1.0,
                       top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Inverse-CDF sampling, one uniform number per row.

    Args:
        logits: ``[B, V]`` next-token logits (any float dtype; computed in float32).
        uniforms: ``[B]`` numbers in ``[0, 1)``.
        temperature, top_p, top_k: as in :class:`GenerationConfig`; ``temperature`` may be a
            float tensor ``[B]``, one per row (the same result for each row as its float).
    Returns:
        ``LongTensor [B]``: the token whose cumulative probability interval (tokens sorted by
        decreasing probability, after temperature, top-k and top-p, renormalised) contains
        ``uniforms``. Top-p keeps the smallest set of most likely tokens whose mass reaches
        ``top_p`` (always at least one).
    """
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(logits.device, torch.float32).reshape(-1, 1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, sorted_idx = torch.sort(probs, dim=-1, descending=True, stable=True)
    if top_k > 0 and top_k < sorted_p.shape[-1]:
        sorted_p[:, top_k:] = 0
    if top_p < 1.0:
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p * sorted_p.sum(-1, keepdim=True), 0)
    cdf = torch.cumsum(sorted_p, dim=-1)
    target = uniforms.to(cdf.device, cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
    pos = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
    return sorted_idx.gather(-1, pos).squeeze(-1)


def greedy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """``argmax`` per row (``LongTensor [B]``), as Hugging Face greedy search."""
    return logits.max(dim=-1).indices  # the first maximum, as argmax; faster on CPU (64 x 49152: ~3 vs ~5 ms)


# --------------------------------------------------------------------------------------------
# Incremental detokenisation and stop search
# --------------------------------------------------------------------------------------------

class StopScanner:
    """Decodes one sequence's new tokens incrementally and reports the first text stop.

    Each :meth:`push` decodes only the tail ``ids[prefix_offset:]`` (the last emitted token as
    context plus the new ones); text is emitted once it no longer ends in an incomplete
    character (``"\\ufffd"``). Each rule is asked about the new text only (``new_from``).
    """

    def __init__(self, tokenizer: Any, rules: Sequence[StopRule]):
        self.tokenizer = tokenizer
        self.rules = tuple(rules)
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0
        self._read = 0

    def _delta(self) -> str:
        dec = self.tokenizer.decode
        before = dec(self.ids[self._prefix:self._read], skip_special_tokens=True)
        after = dec(self.ids[self._prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def push(self, token_id: int) -> tuple[str, int] | None:
        """Add one token; return ``(finish_reason, cut)`` at the first stop (``cut`` = where the
        text ends, a character index into :attr:`text`), else ``None``."""
        self.ids.append(int(token_id))
        delta = self._delta()
        if not delta:
            return None
        start = len(self.text)
        self.text += delta
        hits = [(hit[0], rule.reason, hit[1]) for rule in self.rules
                if (hit := rule.find(self.text, start)) is not None]  # (completed at, reason, cut)
        if not hits:
            return None
        _, reason, cut = min(hits)
        return reason, cut


def final_text(tokenizer: Any, output_ids: Sequence[int], reason: str, rules: Sequence[StopRule] = (), *,
               scanner_text: str | None = None, cut: int | None = None) -> str:
    """The decoded ``output_ids`` cut at the stop point of ``reason`` (see module docstring).

    The whole sequence is decoded once and the rule of ``reason`` cuts it; if that text does not
    show the stop (a tokenizer whose piecewise decoding differs from whole decoding), the
    scanner's own text and cut are used.
    """
    if tokenizer is None:
        return ""
    ids = list(output_ids[:-1]) if reason == "eos" else list(output_ids)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    rule = next((r for r in rules if r.reason == reason), None)
    if rule is None:
        return text
    hit = rule.find(text)
    if hit is not None:
        return text[:hit[1]]
    return scanner_text[:cut] if scanner_text is not None and cut is not None else text


# --------------------------------------------------------------------------------------------
# Prefill / decode
# --------------------------------------------------------------------------------------------

class RowStops:
    """Per-row stop bookkeeping shared by both decoders: the tokens of each row, its
    :class:`StopScanner`, and its :class:`DecodeResult` once it stops."""

    def __init__(self, n: int, config: GenerationConfig, tokenizer: Any, eos: set[int]):
        self.config, self.tokenizer, self.eos = config, tokenizer, eos
        text_stops = tokenizer is not None and bool(config.stops)
        self.scanners = [StopScanner(tokenizer, config.stops) if text_stops else None for _ in range(n)]
        self.outputs: list[list[int]] = [[] for _ in range(n)]
        self.results: list[DecodeResult | None] = [None] * n

    def push(self, r: int, t: int) -> bool:
        """Record token ``t`` of row ``r``; ``True`` when the row stops with it."""
        out = self.outputs[r]
        out.append(t)
        stop = None
        if t in self.eos:
            stop = ("eos", None)
        elif self.scanners[r] is not None:
            stop = self.scanners[r].push(t)
        if stop is None and len(out) >= self.config.max_new_tokens:
            stop = ("length", None)
        if stop is None:
            return False
        sc = self.scanners[r]
        text = final_text(self.tokenizer, out, stop[0], self.config.stops,
                          scanner_text=sc.text if sc else None, cut=stop[1])
        self.results[r] = DecodeResult(out, stop[0], text)
        return True


def _eos(model, tokenizer, config: GenerationConfig, eos_token_ids: Sequence[int] | None) -> set[int]:
    if not config.stop_on_eos:
        return set()
    return set(eos_token_ids) if eos_token_ids is not None else runtime.eos_ids(model, tokenizer, config.eos_token_ids)


def _chooser(config: GenerationConfig, seeds: Sequence[int],
             temperatures: Sequence[float] | None = None) -> Callable[[torch.Tensor, list[int]], list[int]]:
    """``(logits [n, V], rows) -> tokens``: greedy, or one uniform draw per row from the row's own
    generator (seeded with ``seeds[row]``), at ``temperatures[row]`` (``None``: ``config.temperature``)."""
    if not config.do_sample:
        return lambda logits, rows: greedy_from_logits(logits).tolist()
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def choose(logits: torch.Tensor, rows: list[int]) -> list[int]:
        u = torch.stack([torch.rand((), generator=generators[r], dtype=torch.float64) for r in rows])
        temp = config.temperature if temperatures is None else torch.tensor([float(temperatures[r]) for r in rows])
        return sample_from_logits(logits, u, temperature=temp, top_p=config.top_p,
                                  top_k=config.top_k).tolist()
    return choose


def decode(model: torch.nn.Module, state: DecodeState, config: GenerationConfig, *, tokenizer: Any = None,
           eos_token_ids: Sequence[int] | None = None, row_seeds: Sequence[int] | None = None,
           stats: GenerationStats | None = None,
           row_temperatures: Sequence[float] | None = None) -> list[DecodeResult]:
    """Generate from ``state`` until every row stops; ``state`` is consumed (its cache grows and
    loses finished rows). The padded-batch decoder (the slot decoder of
    :mod:`~cca_fast.generation.slots` is what :func:`generate` takes where it can).

    Args:
        state: e.g. from :func:`prefill`, or a prefix state ``.repeat(k)``-ed for k samples.
        config: decoding settings (``batch_size``, ``seed`` and ``share_prefix`` are not used
            here).
        tokenizer: needed for the text stops and :attr:`DecodeResult.text`; with ``None`` only
            EOS and length stop the rows and texts are empty.
        eos_token_ids: ids that end a row (``None`` = :func:`cca_fast.models.runtime.eos_ids` of the model and
            tokenizer, plus ``config.eos_token_ids``); ignored if ``config.stop_on_eos`` is off.
        row_seeds: one generator seed per row for sampling (``None`` = :func:`row_seed`
            ``(config.seed, row)``).
        row_temperatures: one sampling temperature per row (``None``: ``config.temperature``).
    Returns:
        One :class:`DecodeResult` per row of ``state``, in order.
    """
    B = state.batch_size
    rs = RowStops(B, config, tokenizer, _eos(model, tokenizer, config, eos_token_ids))
    seeds = list(row_seeds) if row_seeds is not None else [row_seed(config.seed, i) for i in range(B)]
    if config.do_sample and len(seeds) != B:
        raise CCAError(f"row_seeds has {len(seeds)} entries for a batch of {B}")
    _check_temperatures(row_temperatures, B)
    choose = _chooser(config, seeds, row_temperatures)
    results = rs.results
    active = list(range(B))  # original row of each running row
    logits = state.next_logits
    device = logits.device
    step = 0  # tokens decoded so far by every running row (rows advance together)

    with torch.no_grad():
        while True:
            tokens = choose(logits, active)
            step += 1
            keep: list[int] = []
            n_new = n_done = 0  # tokens kept in outputs; rows stopping at this step
            for j, (r, t) in enumerate(zip(active, tokens)):
                if results[r] is not None:  # stopped earlier, decoding on (early_stop=False)
                    if step < config.max_new_tokens:
                        keep.append(j)
                    continue
                n_new += 1
                if not rs.push(r, t):
                    keep.append(j)
                    continue
                n_done += 1
                if not config.early_stop and step < config.max_new_tokens:
                    keep.append(j)  # the reference procedure decodes max_new_tokens regardless
            if stats is not None:
                stats.generated_tokens += n_new
                stats.discarded_tokens += len(active) - n_new
                stats.sequences += n_done
            if not keep:
                break
            idx = torch.tensor(keep, dtype=torch.long, device=device)
            if len(keep) < len(active):
                state.select(idx)
                active = [active[j] for j in keep]
            step_tokens = torch.tensor([tokens[j] for j in keep], dtype=torch.long, device=device)
            mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(len(active), 1)], dim=1)
            logits, state.cache = runtime.forward(model, input_ids=step_tokens.unsqueeze(1), attention_mask=mask,
                                                  position_ids=state.next_position.unsqueeze(1), cache=state.cache,
                                                  keep=1)
            logits = logits[:, -1, :]
            state.attention_mask, state.next_logits = mask, logits
            state.next_position = state.next_position + 1
            if stats is not None:
                stats.decode_steps += 1
    return [r for r in results if r is not None]


# --------------------------------------------------------------------------------------------
# High level
# --------------------------------------------------------------------------------------------

def encode(tokenizer: Any, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    """Token ids of ``prompts``: id lists pass through; strings are encoded with the tokenizer's
    default special tokens (use :func:`cca_fast.evaluation.prompting.encode_prompts` for chat prompts)."""
    out: list[list[int]] = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise CCAError("text prompts need a tokenizer; pass token id lists instead")
            out.append(list(tokenizer(p)["input_ids"]))
        else:
            out.append([int(t) for t in p])
        if not out[-1]:
            raise CCAError("empty prompt: every prompt needs at least one token")
    return out


def generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str] | Sequence[Sequence[int]],
             config: GenerationConfig | None = None, *, row_seeds: Sequence[int] | None = None,
             row_temperatures: Sequence[float] | None = None,
             callback: Callable[[list[int], list[Generation]], None] | None = None,
             stats: GenerationStats | None = None, prefix_cache: PrefixCache | None = None) -> list[Generation]:
    """Generate a continuation of each prompt.

    Args:
        model: a causal LM (any device and dtype; run in whatever train/eval mode it is in).
        tokenizer: for text prompts, text stops and texts; may be ``None`` with id prompts.
        prompts: strings or token id lists.
        config: decoding settings (default :class:`GenerationConfig`).
        row_seeds: one sampling seed per prompt (default :func:`row_seed` ``(config.seed, i)``).
        row_temperatures: one sampling temperature per prompt (default ``config.temperature``):
            prompts sampled at different temperatures share one call (and its slots); each row's
            tokens are those it gets alone at its temperature.
        callback: called after each batch with the prompt indices and their generations.
        stats: counters to accumulate into.
        prefix_cache: a :class:`~cca_fast.generation.prefix.PrefixCache` kept across calls: the
            prompts' common prefix (e.g. the few-shot exemplars) is then taken from its stored
            key/value cache as far as it matches, instead of being recomputed, and stored for
            the next call. Only used with ``config.share_prefix``; with it even a single prompt
            shares (all but its last token). Its pinned prefix (:meth:`PrefixCache.pin`), when
            every prompt starts with it and their common prefix is not much longer, is shared
            as it is (computed once per weights version).
    Returns:
        One :class:`Generation` per prompt, in input order.
    """
    with slots.LOCK, compute_context(model, (config or GenerationConfig()).compute_dtype):
        # the lock: threads sharing a model must not see its attention switched (slots.attention_as)
        return _generate(model, tokenizer, prompts, config, row_seeds=row_seeds, row_temperatures=row_temperatures,
                         callback=callback, stats=stats,
                         prefix_cache=prefix_cache)


def _check_temperatures(temps: Sequence[float] | None, n: int) -> None:
    if temps is None:
        return
    if len(temps) != n:
        raise CCAError(f"row_temperatures has {len(temps)} entries for {n} prompts; give one per prompt")
    bad = [t for t in temps if not float(t) > 0]
    if bad:
        raise CCAError(f"row_temperatures must all be > 0, got {bad[:3]}")


def _generate(model, tokenizer, prompts, config, *, row_seeds, row_temperatures, callback, stats,
              prefix_cache) -> list[Generation]:
    config = config or GenerationConfig()
    seqs = encode(tokenizer, prompts)
    if row_seeds is not None and len(row_seeds) != len(seqs):
        raise CCAError(f"row_seeds has {len(row_seeds)} entries for {len(seqs)} prompts")
    seeds = list(row_seeds) if row_seeds is not None else [row_seed(config.seed, i) for i in range(len(seqs))]
    _check_temperatures(row_temperatures, len(seqs))
    pad = runtime.pad_id(model, tokenizer)
    eos = runtime.eos_ids(model, tokenizer, config.eos_token_ids)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    results: list[Generation | None] = [None] * len(seqs)

    shared = 0
    if config.share_prefix and (len(seqs) > 1 or prefix_cache is not None):
        shared = shared_len(seqs, config.min_shared_prefix)
        if shared and not can_share(model, max(len(s) for s in seqs) + config.max_new_tokens):
            shared = 0
    prefix_state = None
    pinned = prefix_cache.pinned_len(seqs) if shared and prefix_cache is not None else 0
    if pinned and shared - pinned < prefix_cache.min_reuse:  # the pinned exemplars, computed once per weights
        shared, prefix_state = pinned, prefix_cache.pinned_state(model, pad_id=pad, stats=stats)
    elif shared and prefix_cache is not None:  # (shared > 0 implies config.share_prefix)
        prefix_state = prefix_cache.state(model, seqs[0][:shared], pad_id=pad, stats=stats)
    elif shared:
        prefix_state = prefill(model, [seqs[0][:shared]], pad_id=pad, stats=stats)

    longest = max(len(s) for s in seqs) + config.max_new_tokens
    if config.continuous and slots.supported(model, longest):
        P = shared if prefix_state is not None else 0
        rs = RowStops(len(seqs), config, tokenizer, _eos(model, tokenizer, config, eos))

        def push(i: int, t: int) -> bool:
            stopped = rs.push(i, t)
            if stopped:
                o = rs.results[i]
                results[i] = Generation(prompt_ids=seqs[i], output_ids=o.output_ids, text=o.text,
                                        prompt_len=len(seqs[i]), finish_reason=o.finish_reason,
                                        n_generated=len(o.output_ids))
                if callback is not None:
                    callback([i], [results[i]])
            return stopped

        slots.run_slots(model, [s[P:] for s in seqs], slots=config.slots or config.batch_size, max_new_tokens=config.max_new_tokens,
                        prefix=prefix_state, choose=_chooser(config, seeds, row_temperatures), push=push,
                        early_stop=config.early_stop, stats=stats)
        return [g for g in results if g is not None]

    for b in range(0, len(order), config.batch_size):
        rows = order[b:b + config.batch_size]
        if prefix_state is not None:
            state = prefill(model, [seqs[i][shared:] for i in rows], pad_id=pad, prefix=prefix_state, stats=stats)
        else:
            state = prefill(model, [seqs[i] for i in rows], pad_id=pad, stats=stats)
        outs = decode(model, state, config, tokenizer=tokenizer, eos_token_ids=eos,
                      row_seeds=[seeds[i] for i in rows], stats=stats,
                      row_temperatures=None if row_temperatures is None else [row_temperatures[i] for i in rows])
        batch = []
        for i, o in zip(rows, outs):
            results[i] = Generation(prompt_ids=seqs[i], output_ids=o.output_ids, text=o.text,
                                    prompt_len=len(seqs[i]), finish_reason=o.finish_reason,
                                    n_generated=len(o.output_ids))
            batch.append(results[i])
        del state
        if callback is not None:
            callback(rows, batch)
    return [g for g in results if g is not None]
