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
wrapped models             :func:`unwrap`: the transformers model inside a peft model,
                           ``torch.compile`` or a user's module; :func:`base_parameters`,
                           :func:`submodule`: the base weights and layers under the plain
                           model's names
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

from cca_fast.errors import CCAError, WrappedModelError

CACHE_KEYWORDS = ("cache", "past_key_values")  # newest first


class FastPathWarning(UserWarning):
    """A speed-up cca_fast would take is unavailable for this model / transformers version; the
    results are the same, only slower."""


def _is_hf_model(m: object) -> bool:
    """A transformers model: a module with ``config.model_type`` and ``get_input_embeddings``
    (``PreTrainedModel``; duck-typed, so this module imports no transformers)."""
    return (isinstance(m, nn.Module) and isinstance(getattr(getattr(m, "config", None), "model_type", None), str)
            and callable(getattr(type(m), "get_input_embeddings", None)))


def _is_peft(m: object) -> bool:
    return isinstance(m, nn.Module) and hasattr(m, "peft_config") and callable(getattr(m, "get_base_model", None))


def module_tree(model: nn.Module, depth: int = 3, width: int = 6) -> str:
    """The first levels of ``model``'s module tree, one ``name: Type`` line each (at most
    ``width`` children per module; the children of a ``ModuleList`` shown by its first entry), for
    error messages."""
    lines = [type(model).__name__]

    def walk(m: nn.Module, level: int) -> None:
        if level > depth:
            return
        kids = list(m.named_children())
        if (isinstance(m, (nn.ModuleList, nn.Sequential)) and len(kids) > 1
                and len({type(c) for _, c in kids}) == 1):  # repeated layers: the first stands for all
            first = kids[0][1]
            lines.append(f"{'  ' * level}0..{len(kids) - 1}: {type(first).__name__} x {len(kids)}")
            walk(first, level + 1)
            return
        for name, child in kids[:width]:
            lines.append(f"{'  ' * level}{name}: {type(child).__name__}")
            walk(child, level + 1)
        if len(kids) > width:
            lines.append(f"{'  ' * level}... {len(kids) - width} more")

    walk(model, 1)
    return "\n".join(lines)


def unwrap(model: nn.Module, *, strict: bool = False) -> nn.Module:
    """The Hugging Face causal LM inside ``model``: the one place cca_fast looks through wrappers.

    * ``torch.compile(model)`` (an ``OptimizedModule``): its ``_orig_mod`` (cca_fast runs the
      eager model: hooks registered after compiling are not seen by the compiled graph);
    * a peft model (``PeftModel``, LoRA and the other weight adapters): ``get_base_model()``, the
      transformers model whose layers carry the adapters (running it runs them). The components
      and the rows stage 3 changes are those of the *base* weights (:func:`base_parameters`); the
      adapters' own weights are left as they are. Prompt-learning adapters (prefix / prompt
      tuning) change the inputs, not the weights, and are refused;
    * your own module holding the transformers model as an attribute (at any depth, as long as
      there is exactly one): that model (your wrapper's ``forward`` is not called).

    A transformers model is returned as is. A module with no transformers model inside (a test
    stand-in with its own ``forward``) is returned as is too, unless ``strict``: then it raises
    :class:`WrappedModelError` naming the module tree it found (as do several candidates, and a
    prompt-learning peft model, always).
    """
    seen: list[str] = []
    for _ in range(8):
        if _is_hf_model(model) and not _is_peft(model):
            return model
        inner = getattr(model, "_orig_mod", None)  # torch.compile
        if isinstance(inner, nn.Module):
            seen.append("torch.compile")
            model = inner
            continue
        if _is_peft(model):
            cfg = getattr(model, "active_peft_config", None)
            if getattr(cfg, "is_prompt_learning", False):
                raise WrappedModelError(
                    f"this peft model uses a prompt-learning adapter ({getattr(cfg, 'peft_type', '?')}): it changes "
                    "the inputs, not the weights, so cca_fast cannot run it; pass the base model "
                    "(model.get_base_model()) or a model with a LoRA-style adapter")
            seen.append("peft")
            model = model.get_base_model()
            continue
        found = _find_hf_models(model)
        if len(found) == 1:
            seen.append(f"attribute {found[0][0]!r}")
            model = found[0][1]
            continue
        if not found and not strict:
            return model
        how = ("holds several transformers models (" + ", ".join(n for n, _ in found) + "): pass the one to use"
               if found else "holds no transformers model (no module with config.model_type and "
                             "get_input_embeddings)")
        through = f" (looked through: {', '.join(seen)})" if seen else ""
        raise WrappedModelError(
            f"cannot find the causal LM in this {type(model).__name__}{through}: it {how}. cca_fast takes a "
            "transformers causal LM, a peft model of one, torch.compile of one, or a module holding one as an "
            f"attribute. Module tree found:\n{module_tree(model)}")
    raise WrappedModelError(f"too many nested wrappers around the model ({', '.join(seen)}); pass the inner model")


def _find_hf_models(model: nn.Module, max_depth: int = 4) -> list[tuple[str, nn.Module]]:
    """The outermost transformers models (or peft / compiled wrappers of one) among the
    submodules of ``model``, breadth first, by name; each distinct module once."""
    out: list[tuple[str, nn.Module]] = []
    frontier: list[tuple[str, nn.Module]] = list(model.named_children())
    for _ in range(max_depth):
        nxt: list[tuple[str, nn.Module]] = []
        for name, m in frontier:
            if _is_hf_model(m) or _is_peft(m) or isinstance(getattr(m, "_orig_mod", None), nn.Module):
                if all(m is not o for _, o in out):
                    out.append((name, m))
            else:
                nxt += [(f"{name}.{n}", c) for n, c in m.named_children()]
        if out:
            return out
        frontier = nxt
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers causal LM cca_fast works on inside ``model`` (a peft model, a
    ``torch.compile`` d model or your own module holding one; see :func:`unwrap`);
    :class:`~cca_fast.errors.WrappedModelError` naming the module tree when there is none."""
    return unwrap(model, strict=True)


def _tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """peft tuner layers (a module with a ``base_layer`` it wraps, defined by peft) of the
    unwrapped model, by name."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(getattr(m, "base_layer", None), nn.Module) and type(m).__module__.startswith("peft.")]


def _base_name(name: str, tuners: Sequence[str]) -> str | None:
    """``name`` (a parameter or buffer of the unwrapped model) as the plain model calls it:
    ``X.base_layer.weight`` of a tuner layer ``X`` is ``X.weight``; an adapter's own tensors
    (``X.lora_A.default.weight``...) have no base name (``None``)."""
    for t in sorted(tuners, key=len, reverse=True):
        if name.startswith(t + "."):
            rest = name[len(t) + 1:]
            if not rest.startswith("base_layer."):
                return None
            return _base_name(t + "." + rest[len("base_layer."):], [u for u in tuners if u != t])
    return name


def base_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of the base weights of ``model`` (unwrapped, :func:`unwrap`) under
    the names the plain transformers model gives them: for a peft model the wrapped layers' own
    weights (``q_proj.base_layer.weight`` is ``q_proj.weight``), the adapters' weights left out.
    The same names for a plain model and a peft model of it, so a delta made on one fits the
    other. For a plain model: ``dict(model.named_parameters())``."""
    inner = unwrap(model)
    tuners = [n for n, _ in _tuner_layers(inner)]
    if not tuners:
        return dict(inner.named_parameters())
    out: dict[str, nn.Parameter] = {}
    for name, p in inner.named_parameters():
        base = _base_name(name, tuners)
        if base is not None:
            out[base] = p
    return out


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain transformers model inside ``model`` (:func:`base_parameters`
    and the persistent buffers, under the plain model's names; adapter tensors left out): what
    ``save_pretrained(..., state_dict=...)`` writes so that a peft model saves as its base model."""
    inner = unwrap(model)
    tuners = [n for n, _ in _tuner_layers(inner)]
    out: dict[str, torch.Tensor] = {}
    for name, t in inner.state_dict().items():
        base = _base_name(name, tuners)
        if base is not None:
            out[base] = t
    return out


def has_adapters(model: nn.Module) -> bool:
    """Whether the unwrapped ``model`` carries peft adapter layers."""
    return bool(_tuner_layers(unwrap(model)))


def submodule(model: nn.Module, name: str, *, base: bool = False) -> nn.Module:
    """The module called ``name`` in the unwrapped ``model``. With ``base``, a peft tuner layer
    there is replaced by the layer it wraps (whose weight rows stage 3 changes); without it, the
    tuner layer itself (its output, the activation the model computes, includes the adapter's
    contribution)."""
    inner = unwrap(model)
    try:
        m = inner.get_submodule(name)
    except AttributeError:
        raise CCAError(f"the model has no module {name!r} (module tree:\n{module_tree(inner)})") from None
    while base and isinstance(getattr(m, "base_layer", None), nn.Module) and type(m).__module__.startswith("peft."):
        if getattr(m, "merged", False):
            raise CCAError(f"{name}: its peft adapter is merged into the base weights, so the base rows are not "
                           "the base model's; unmerge it (model.unmerge_adapter()) or merge_and_unload() first")
        m = m.base_layer
    return m


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


def keep_kwargs(model: nn.Module, n: "int | torch.Tensor | None") -> dict[str, Any]:
    """``{"logits_to_keep": n}`` when the model takes it and ``n`` is a positive count or a 1-D
    tensor of positions to keep, else ``{}`` (the caller then slices the logits it needs)."""
    if isinstance(n, torch.Tensor):
        return {"logits_to_keep": n} if accepts_logits_to_keep(model, warn=False) else {}
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
        out = unwrap(model)(**inputs, **keep_kwargs(model, keep))
        new = None
    else:
        out = unwrap(model)(**inputs, **{kw: cache}, use_cache=use_cache, **keep_kwargs(model, keep))
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
    model = unwrap(model)
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
