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
        pad_id: token used for left padding (``None``: the model's pad, else EOS, else 0).
        absolute: ``|score|`` per example before summing.
        kinds: kinds to score.
        backend: kernel backend (``None``: Triton on CUDA, PyTorch elsewhere).
    """

    batch_size: int = 8
    pad_id: int | None = None
    absolute: bool = False
    kinds: tuple[str, ...] = KINDS
    backend: Backend | None = None

    def __post_init__(self) -> None:
        if int(self.batch_size) < 1:
            raise CCAError(f"AtPConfig.batch_size must be >= 1, got {self.batch_size}")


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
    check_examples(examples, getattr(model.config, "vocab_size", None))
    device = runtime.input_device(model)
    pad = runtime.pad_id(model, explicit=config.pad_id)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prefix_ids))  # less padding
    bs = int(config.batch_size)
    chunks = [order[i : i + bs] for i in range(0, len(order), bs)]
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
