"""How cca_fast talks to a Hugging Face model: the one owner of every model-runtime rule.

Each question below is answered here and nowhere else; the rest of the package asks.

=========================  ===================================================================
rule                       function
=========================  ===================================================================
cache keyword              :func:`cache_keyword`: ``cache`` (transformers >= 5.24), else
                           ``past_key_values`` (4.56 - 5.23, and remote-code models), probed
                           once per model class from ``forward``'s signature
cache in the output        read from the output attribute of the same name (:func:`forward`)
``logits_to_keep``         :func:`accepts_logits_to_keep`, :func:`keep_kwargs`
EOS ids                    :func:`eos_ids`: the tokenizer's ``eos_token_id`` + the model's
                           ``generation_config.eos_token_id`` (+ extras)
pad id                     :func:`pad_id`: explicit > tokenizer's pad > model config's pad >
                           the first EOS id > 0 (its value never matters: pad slots are masked)
input device               :func:`input_device`: the input embedding's device (also under a
                           ``device_map``), the first parameter's as a fallback
frozen / eval              :func:`frozen`, :func:`eval_mode` (context managers that restore)
attention backend          :func:`attention_backend`: what the model runs (``sdpa``,
                           ``flash_attention_2``, ``eager``...), for reports
=========================  ===================================================================

A fast path that cannot be taken on the installed versions (no cache keyword: the few-shot
prefix cannot be shared; no ``logits_to_keep``: logits at every position) warns once per model
class, naming the cause; results stay exact, only slower. :func:`forward` is the one place that
passes a cache to a model.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn

CACHE_KEYWORDS = ("cache", "past_key_values")  # newest first


class FastPathWarning(UserWarning):
    """A speed-up cca_fast would take is unavailable for this model / transformers version; the
    results are the same, only slower."""


def unwrap(model: nn.Module) -> nn.Module:
    """The model whose ``forward`` defines the keywords: a peft wrapper passes ``**kwargs``
    through to its base model (``get_base_model``), so that one is asked."""
    seen = 0
    while hasattr(model, "get_base_model") and seen < 8:
        inner = model.get_base_model()
        if inner is model:
            break
        model, seen = inner, seen + 1
    return model


@functools.lru_cache(maxsize=None)
def _forward_keywords(cls: type) -> frozenset[str]:
    """Named parameters of ``cls.forward`` (``**kwargs`` does not count: a keyword that only
    lands in ``**kwargs`` may be ignored silently)."""
    params = inspect.signature(cls.forward).parameters.values()
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _warn_once(cls: type, what: str) -> None:
    _warn_once_cached(cls, what)


@functools.lru_cache(maxsize=None)
def _warn_once_cached(cls: type, what: str) -> None:
    warnings.warn(f"{cls.__name__}: {what}", FastPathWarning, stacklevel=4)


def cache_keyword(model: nn.Module, *, warn: bool = True) -> str | None:
    """The keyword that passes a key/value cache to ``model.forward`` (``"cache"`` or
    ``"past_key_values"``), or ``None`` when its forward takes neither (then a
    :class:`FastPathWarning` is issued once for the class, unless ``warn=False``)."""
    cls = type(unwrap(model))
    names = _forward_keywords(cls)
    for kw in CACHE_KEYWORDS:
        if kw in names:
            return kw
    if warn:
        _warn_once(cls, "forward takes no key/value cache argument (neither 'cache' nor 'past_key_values'): "
                        "prompt prefixes are recomputed for every sequence (same results, slower)")
    return None


def accepts_logits_to_keep(model: nn.Module, *, warn: bool = True) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (the lm head then runs only on the
    positions whose logits are used). Without it a :class:`FastPathWarning` is issued once."""
    cls = type(unwrap(model))
    ok = "logits_to_keep" in _forward_keywords(cls)
    if not ok and warn:
        _warn_once(cls, "forward takes no 'logits_to_keep': the lm head runs on every position "
                        "(same results, more time and memory)")
    return ok


def keep_kwargs(model: nn.Module, n: int | None) -> dict[str, int]:
    """``{"logits_to_keep": n}`` when the model takes it and ``n`` is a positive count, else ``{}``
    (the caller then slices the logits it needs)."""
    return {"logits_to_keep": int(n)} if n and accepts_logits_to_keep(model) else {}


def new_cache(model: nn.Module) -> Any:
    """An empty ``DynamicCache`` laid out for ``model`` (sliding-window layers included)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=unwrap(model).config)
    except TypeError:  # pragma: no cover - older signature
        return DynamicCache()


def forward(model: nn.Module, *, cache: Any = None, use_cache: bool | None = None, keep: int | None = None,
            **inputs: Any) -> tuple[torch.Tensor, Any]:
    """Run ``model(**inputs)`` passing ``cache`` under the model's own keyword.

    Args:
        cache: a key/value cache to continue (grown in place by the model), or ``None``.
        use_cache: return a cache (default: whether ``cache`` was given). Without a cache keyword
            (see :func:`cache_keyword`) a given ``cache`` is an error: callers check
            :func:`cache_keyword` first and take their plain path.
        keep: compute logits for the last ``keep`` positions only (when the model allows; the
            returned logits are sliced to ``keep`` either way). ``None``: every position.
        inputs: ``input_ids``, ``attention_mask``, ``position_ids``, ... ``[B, T]``.
    Returns:
        ``(logits [B, keep or T, V], cache or None)``.
    """
    use_cache = cache is not None if use_cache is None else use_cache
    kw = cache_keyword(model, warn=False)
    if kw is None:
        if cache is not None or use_cache:
            raise TypeError(f"{type(unwrap(model)).__name__}.forward takes no key/value cache; "
                            "check runtime.cache_keyword(model) before passing one")
        out = model(**inputs, **keep_kwargs(model, keep))
        new = None
    else:
        out = model(**inputs, **{kw: cache}, use_cache=use_cache, **keep_kwargs(model, keep))
        new = getattr(out, kw, None) if use_cache else None
    logits = out.logits if keep is None else out.logits[:, -int(keep):]
    return logits, new


def eos_ids(model: nn.Module | None, tokenizer: Any, extra: Sequence[int] = ()) -> set[int]:
    """Token ids that end a sequence: ``extra`` + the tokenizer's ``eos_token_id`` + the model's
    ``generation_config.eos_token_id`` (an int or a list)."""
    ids = {int(t) for t in extra}
    tok_eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    gen_cfg = getattr(unwrap(model), "generation_config", None) if model is not None else None
    for v in (tok_eos, getattr(gen_cfg, "eos_token_id", None)):
        if v is None:
            continue
        ids.update(int(t) for t in (v if isinstance(v, (list, tuple)) else [v]))
    return ids


def pad_id(model: nn.Module | None = None, tokenizer: Any = None, explicit: int | None = None) -> int:
    """The id written into pad slots: ``explicit``, else the tokenizer's ``pad_token_id``, else the
    model config's ``pad_token_id``, else the first EOS id (tokenizer's, then the config's), else
    0. Pad slots are always masked, so the value only has to be a valid token id."""
    if explicit is not None:
        return int(explicit)
    cfg = getattr(unwrap(model), "config", None) if model is not None else None
    for v in (getattr(tokenizer, "pad_token_id", None), getattr(cfg, "pad_token_id", None),
              getattr(tokenizer, "eos_token_id", None), getattr(cfg, "eos_token_id", None)):
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if isinstance(v, int):
            return v
    return 0


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the input embedding's device (right under ``device_map`` too), else
    the first parameter's."""
    get_emb = getattr(model, "get_input_embeddings", None)
    if callable(get_emb):
        try:
            return get_emb().weight.device
        except (AttributeError, NotImplementedError):
            pass
    return next(model.parameters()).device


def attention_backend(model: nn.Module) -> str:
    """The attention implementation ``model`` runs (``config._attn_implementation``: ``"sdpa"``,
    ``"flash_attention_2"``, ``"eager"``...), ``"unknown"`` when the model has no such config."""
    cfg = getattr(unwrap(model), "config", None)
    attn = getattr(cfg, "_attn_implementation", None)
    return str(attn) if attn else "unknown"


def sliding_window(model: nn.Module) -> int | None:
    """The model's sliding attention window in cache slots, or ``None``."""
    w = getattr(getattr(unwrap(model), "config", None), "sliding_window", None)
    return w if isinstance(w, int) and w > 0 else None


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Every parameter's ``requires_grad`` off inside the block, restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in flags:
            p.requires_grad_(f)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block (no dropout), every module's training flag restored
    after (a model partly in train mode comes back exactly as it was)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was in flags:
            m.training = was
