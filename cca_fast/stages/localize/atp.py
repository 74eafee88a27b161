"""Stage 2, fast selector: gradient x activation attribution (AtP) of every component.

The metric is the sum over examples of the logit difference ``logit[desired] - logit[undesired]``
at the last prefix position (the intervention position); components are scored at that
position only. One forward and one backward pass per batch, accumulated over batches, weights
frozen, every site's gradient checked (:class:`cca_fast.attribution.AttributionSession`).

A component's score is ``d(sum of logit diffs) / d(scale)`` at scale 1, i.e. half the
derivative of the logit difference in its DCM mask value at ``m = 0.5`` (scale ``2m = 1``):
DCM's first gradient step up to that factor (METHOD section 2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch
from torch import nn

from cca_fast.attribution import Attribution, AttributionSession, default_pivot_metric
from cca_fast.errors import CCAError
from cca_fast.kernels.dispatch import Backend
from cca_fast.stages.examples import PivotExample, collate
from cca_fast.models.adapters import KINDS
from cca_fast.models.components import ComponentSpace
from cca_fast.models import runtime

Progress = Union[bool, Callable[[dict], None]]


@dataclass
class AtPConfig:
    """Options of :func:`run_atp`.

    Attributes:
        batch_size: examples per forward/backward pass (scores are summed over batches, so
            the result does not depend on it beyond rounding).
        max_batch_tokens: at most this many padded tokens (examples x longest prefix) per pass,
            ``None`` for no limit. Backward keeps every layer's activations, and on the CPU the
            attention probabilities too: about 1.5 MB per token on SmolLM2-135M in float32, so
            16 pivots of an 8-shot prompt (14k tokens) need over 20 GB; 4096 tokens stay near
            6 GB. A longer single example still runs, alone.
        pad_id: token used for left padding (``None``: the model's pad, else EOS, else 0).
        absolute: ``|score|`` per example before summing.
        kinds: kinds to score.
        backend: kernel backend (``None``: Triton on CUDA, PyTorch elsewhere).
    """

    batch_size: int = 8
    max_batch_tokens: int | None = 4096
    pad_id: int | None = None
    absolute: bool = False
    kinds: tuple[str, ...] = KINDS
    backend: Backend | None = None

    def __post_init__(self) -> None:
        if int(self.batch_size) < 1:
            raise CCAError(f"AtPConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.max_batch_tokens is not None and int(self.max_batch_tokens) < 1:
            raise CCAError(f"AtPConfig.max_batch_tokens must be >= 1 or None, got {self.max_batch_tokens}")


def length_chunks(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices ``0..len(lengths)-1`` sorted by length (less padding), cut into consecutive chunks
    of at most ``batch_size`` indices and at most ``max_tokens`` padded tokens (chunk size x its
    longest length); an index whose length alone exceeds ``max_tokens`` gets a chunk of its own."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks: list[list[int]] = []
    for i in order:
        cur = chunks[-1] if chunks else None
        fits = cur is not None and len(cur) < batch_size and (
            max_tokens is None or (len(cur) + 1) * lengths[i] <= max_tokens)  # sorted: lengths[i] is the longest
        if fits:
            cur.append(i)
        else:
            chunks.append([i])
    return chunks


def check_examples(examples: Sequence[PivotExample], vocab_size: int | None = None) -> None:
    """:class:`CCAError` for an empty list, an empty prefix or a token id out of range."""
    if not examples:
        raise CCAError("no pivot examples: stage 2 needs at least one (run stage 1 first)")
    for e in examples:
        if len(e.prefix_ids) == 0:
            raise CCAError(f"example {e.problem_id!r} has an empty prefix; the intervention position is its last token")
        if vocab_size is not None:
            ids = list(e.prefix_ids) + [e.desired, e.undesired]
            if min(ids) < 0 or max(ids) >= vocab_size:
                raise CCAError(f"example {e.problem_id!r} has a token id outside [0, {vocab_size}); "
                               "were the examples made with another tokenizer?")


def make_progress(progress: Progress, total: int, desc: str):
    """``(update(info: dict), close())`` for a tqdm bar (``True``), a callback, or nothing."""
    if callable(progress) and not isinstance(progress, bool):
        return progress, (lambda: None)
    if not progress:
        return (lambda info: None), (lambda: None)
    from tqdm.auto import tqdm  # noqa: PLC0415

    bar = tqdm(total=total, desc=desc)

    def update(info: dict) -> None:
        bar.update(1)
        bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items()
                         if k in ("loss", "logit_diff", "n_selected", "epoch")})

    return update, bar.close


def run_atp(model: nn.Module, examples: Sequence[PivotExample], config: AtPConfig | None = None,
            progress: Progress = False, *, space: ComponentSpace | None = None) -> Attribution:
    """AtP scores of every component over ``examples`` (see the module docstring).

    Returns:
        :class:`Attribution`; ``scores [space.total]`` summed over examples.
    """
    config = config or AtPConfig()
    space = space if space is not None else ComponentSpace(model)
    model = runtime.unwrap(model)  # peft / torch.compile / a user's wrapper: the model inside
    check_examples(examples, getattr(model.config, "vocab_size", None))
    device = runtime.input_device(model)
    pad = runtime.pad_id(model, explicit=config.pad_id)
    chunks = length_chunks([len(e.prefix_ids) for e in examples], int(config.batch_size), config.max_batch_tokens)
    kwargs = runtime.keep_kwargs(model, 1)
    update, close = make_progress(progress, len(chunks), "AtP")
    try:
        with AttributionSession(model, space, kinds=config.kinds, absolute=config.absolute,
                                backend=config.backend) as session:
            for chunk in chunks:
                batch = collate([examples[i] for i in chunk], pad, device)
                out = session.forward(batch.model_inputs(), -1, **kwargs)
                value = default_pivot_metric(out.logits, batch)
                session.backward(value)
                update({"logit_diff": float(value.detach()) / len(chunk)})
            return session.result()
    finally:
        close()


def atp_scores(model: nn.Module, examples: Sequence[PivotExample], batch_size: int = 8,
               **kwargs) -> torch.Tensor:
    """Shortcut: ``run_atp(...).scores`` (``[total]``)."""
    return run_atp(model, examples, AtPConfig(batch_size=batch_size, **kwargs)).scores
