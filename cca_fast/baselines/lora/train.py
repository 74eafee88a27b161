"""The LoRA baseline (paper: LoRA, r=16, alpha=32, trained on the gold solutions).

Supervised fine-tuning with ``peft`` LoRA adapters on ``prompt + " " + gold_target``: the prompt
is the evaluation prompt (:func:`cca_fast.evaluation.prompting.build_prompt`, few-shot exemplars included),
the target is the problem's GSM8K solution rewritten in the exemplar style (:func:`gold_target`),
and the loss is the mean next-token cross-entropy over the *target tokens only* (prompt and pad
positions carry the label ``-100``). Validation accuracy is measured at epoch 0 (the base) and
after every epoch; the best epoch's adapter is kept (model selection as in CCA's stage 3).

Fast path: every training sequence starts with the same few-shot prompt prefix (811 of ~885
tokens with the paper's 8-shot prompt and SmolLM2's tokenizer), so each micro-batch runs that
prefix once (batch 1, with gradients) and expands its KV cache to the batch; the rows' own
suffixes (question + target) follow it, padded (:mod:`cca_fast.stages.sft`). Loss and gradients
are those of running every row in full (the tests check this), for about 5x fewer tokens per
8-row micro-batch with the 8-shot prompt.

Evaluation uses the plain Hugging Face model (our generation code drives the model with its own
cache), so a trained adapter is *merged* into the base weights in place by :func:`merge_lora`,
whose handle's :meth:`MergedLoRA.restore` puts back bit-identical base weights. Merging, saving
and loading need only ``torch`` and ``safetensors``; training needs ``peft``
(``pip install peft``). Adapters are saved the ``peft`` way (``adapter_config.json`` +
``adapter_model.safetensors``, loadable by ``peft.PeftModel.from_pretrained``) plus
``lora_result.json`` (history, best epoch).
"""
from __future__ import annotations

import json
import math
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import nn

from cca_fast.data.problem import Problem
from cca_fast.errors import CCAError
from cca_fast.baselines.lora.adapter import (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, RESULT_NAME, LoRAResult, MergedLoRA,
                           load_lora, merge_lora, module_names)
from cca_fast.stages.sft import (SFTBatch, SFTExample, build_sft_examples, collate_sft, gold_target, sft_nll,
                       shared_prefix_len, target_text)
from cca_fast.evaluation.prompting import PromptConfig
from cca_fast.generation.prefix import can_share
from cca_fast.models import runtime

__all__ = ["LoRAConfig", "LoRAResult", "MergedLoRA", "train_lora", "merge_lora", "load_lora", "gold_target",
           "target_text", "SFTExample", "SFTBatch", "build_sft_examples", "collate_sft", "sft_nll",
           "shared_prefix_len", "module_names", "default_target_modules",
           "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "RESULT_NAME"]

Progress = Callable[[dict], None]


# ---- configuration --------------------------------------------------------------------------------
@dataclass
class LoRAConfig:
    """LoRA settings (paper: r=16, alpha=32) and the fine-tuning loop.

    Attributes:
        r, alpha, dropout: LoRA rank, scale ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``),
            dropout on the adapter input.
        target_modules: module names or suffixes, a regular expression (full match), or
            ``"all-linear"``; ``None`` = the q/k/v/o and MLP projections of every decoder layer
            (the adapter's ``lora_targets``; ``"all-linear"`` for other families).
        lr, epochs, batch_size: AdamW learning rate, epochs (the best one is kept), sequences
            per optimizer step.
        micro_batch_size: sequences per forward pass (memory only: the gradient of a step is the
            same for any value).
        betas, eps, weight_decay: AdamW options.
        max_grad_norm: clip the global gradient norm of the adapter (``None`` = no clipping).
        lr_schedule: ``"linear"`` decay to 0 over all steps after ``warmup_steps``, or
            ``"constant"``.
        seed: adapter initialisation, dropout and the per-epoch shuffle (the global RNG state is
            left untouched).
        share_prefix: run the common prompt prefix once per micro-batch (same gradients).
        padding_side: padding of the rows.
        pad_id: padding id (default: the model config's pad, else EOS, else 0; any id works).
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str | list[str] | None = None
    use_rslora: bool = False
    lr: float = 2e-4
    epochs: int = 3
    batch_size: int = 8
    micro_batch_size: int = 8
    optimizer: Literal["adamw"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    lr_schedule: Literal["linear", "constant"] = "linear"
    warmup_steps: int = 0
    seed: int = 0
    share_prefix: bool = True
    padding_side: Literal["right", "left"] = "right"
    pad_id: int | None = None

    def check(self) -> None:
        """Raise :class:`CCAError` on a setting out of range."""
        bad = [(self.r < 1, "r must be >= 1"), (self.epochs < 0, "epochs must be >= 0"),
               (self.batch_size < 1 or self.micro_batch_size < 1, "batch sizes must be >= 1"),
               (not 0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"), (self.lr < 0, "lr must be >= 0"),
               (self.optimizer != "adamw", "the only optimizer is 'adamw'"),
               (self.lr_schedule not in ("linear", "constant"), "lr_schedule must be 'linear' or 'constant'"),
               (self.padding_side not in ("right", "left"), "padding_side must be 'right' or 'left'")]
        for cond, msg in bad:
            if cond:
                raise CCAError(f"LoRAConfig: {msg}")
        from cca_fast import checks

        # every float setting is finite (a NaN would be saved and then differ from itself on resume)
        for name, flag in (("alpha", "--lora-alpha"), ("lr", "--lora-lr"), ("dropout", None), ("eps", None),
                           ("weight_decay", None), ("max_grad_norm", None)):
            checks.number(f"LoRAConfig.{name}", getattr(self, name), flag=flag, allow_none=name == "max_grad_norm")
        checks.positive("LoRAConfig.r", self.r, flag="--lora-r")
        checks.seed("LoRAConfig.seed", self.seed, flag=None)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


# ---- training -----------------------------------------------------------------------------------
def _require_peft():
    try:
        import peft
    except ImportError:
        raise CCAError("LoRA training needs the peft package: pip install peft "
                       "(or pip install 'cca_fast[lora]')") from None
    return peft


def default_target_modules(model: nn.Module) -> str:
    """The q/k/v/o and MLP projections of every decoder layer (the adapter's ``lora_targets``,
    :class:`~cca_fast.models.adapters.ModelAdapter`), as a regular expression over module names
    (``"all-linear"`` for a family without an adapter)."""
    from cca_fast.models.adapters import UnsupportedArchitectureError, get_adapter

    try:
        adapter = get_adapter(model)
    except UnsupportedArchitectureError:
        return "all-linear"
    layers, names = adapter.layers_path, adapter.lora_targets
    if not names or not layers:
        return "all-linear"
    return rf"{re.escape(layers)}\.\d+\.(?:{'|'.join(re.escape(n) for n in names)})"


def _lr_lambda(config: LoRAConfig, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.lr_schedule == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - config.warmup_steps))
    return f


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def train_lora(model: nn.Module, tokenizer: Any, problems: Sequence[Problem], prompt: PromptConfig | None = None,
               config: LoRAConfig | None = None, validate: Callable[[nn.Module], float] | None = None,
               progress: Progress | bool | None = True) -> LoRAResult:
    """Fine-tune LoRA adapters on the gold solutions of ``problems`` (see the module docstring).

    Args:
        model: a plain Hugging Face causal LM (any device, any dtype). Adapters are injected for
            training and removed afterwards: on return it is the same plain model (same class,
            same module objects, bit-identical weights, same ``requires_grad`` and train/eval
            state); apply the result with :func:`merge_lora`.
        tokenizer: its tokenizer; problems: training problems (``answer`` ends ``#### N``).
        prompt: the evaluation prompt settings (default :class:`PromptConfig`).
        config: :class:`LoRAConfig`.
        validate: ``validate(model) -> accuracy``, called (eval mode, no grad) at epoch 0 and
            after each epoch on ``model`` with the current adapter *merged* (exactly the weights
            :func:`merge_lora` gives the returned result).
        progress: ``True`` for a progress bar, or a callable receiving each history record.
    """
    t_start = time.perf_counter()
    peft = _require_peft()
    config, prompt = config or LoRAConfig(), prompt or PromptConfig()
    config.check()
    if not problems:
        raise CCAError("LoRA training needs at least one training problem")
    if any(hasattr(m, "base_layer") for m in model.modules()):
        raise CCAError("the model already holds peft adapter layers; pass a plain Hugging Face model")
    examples = build_sft_examples(problems, tokenizer, prompt)
    pad = runtime.pad_id(model, tokenizer, config.pad_id)
    prefix: tuple[int, ...] = ()
    if config.share_prefix and len(examples) > 1:
        P = shared_prefix_len(examples)
        # right padding puts no pad slot between prefix and suffix: only left padding meets the window rule
        longest = max(len(e.prompt_ids) + len(e.target_ids) for e in examples) if config.padding_side == "left" else 0
        if P and can_share(model, longest):
            prefix = examples[0].prompt_ids[:P]
    device = runtime.input_device(model)
    targets = config.target_modules if config.target_modules is not None else default_target_modules(model)
    from transformers.pytorch_utils import Conv1D

    lcfg = peft.LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, bias="none",
                           target_modules=targets, use_rslora=config.use_rslora,
                           fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()))
    n_base = sum(p.numel() for p in model.parameters())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training, attrs = model.training, set(vars(model))
    tp = getattr(model.config, "pretraining_tp", None)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    history: list[dict[str, Any]] = []
    best: tuple[int, float | None, dict[str, torch.Tensor] | None] = (config.epochs, None, None)
    bar = _bar(config.epochs * steps_per_epoch) if progress is True else None
    pm = None
    try:
        with _seeded(config.seed, device):
            with warnings.catch_warnings():  # peft reads a deprecated transformers property
                warnings.simplefilter("ignore", FutureWarning)
                pm = peft.get_peft_model(model, lcfg)
            lora_params = [p for n, p in model.named_parameters() if p.requires_grad]
            n_train = sum(p.numel() for p in lora_params)
            opt = torch.optim.AdamW(lora_params, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                                    weight_decay=config.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config, config.epochs * steps_per_epoch))
            gen = torch.Generator().manual_seed(config.seed)
            for epoch in range(config.epochs + 1):
                record: dict[str, Any] = {"epoch": epoch, "train_loss": None, "seconds": 0.0}
                if epoch > 0:
                    t0, nll_total, tok_total = time.perf_counter(), 0.0, 0
                    model.train()
                    order = torch.randperm(len(examples), generator=gen).tolist()
                    for b in range(0, len(order), config.batch_size):
                        rows = [examples[i] for i in order[b:b + config.batch_size]]
                        n_tok = sum(len(e.target_ids) for e in rows)
                        opt.zero_grad(set_to_none=True)
                        for m in range(0, len(rows), config.micro_batch_size):
                            nll, _ = sft_nll(model, rows[m:m + config.micro_batch_size], pad_id=pad, prefix=prefix,
                                             padding_side=config.padding_side)
                            (nll / n_tok).backward()
                            nll_total += float(nll.detach())
                        tok_total += n_tok
                        if config.max_grad_norm is not None:
                            torch.nn.utils.clip_grad_norm_(lora_params, config.max_grad_norm)
                        opt.step()
                        sched.step()
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(epoch=epoch, loss=f"{nll_total / tok_total:.4f}")
                    record.update(train_loss=nll_total / tok_total, seconds=time.perf_counter() - t0)
                    model.eval()
                weights = _adapter_weights(pm, peft)
                if validate is not None:
                    t0 = time.perf_counter()
                    current = LoRAResult(weights, config.scaling, {})
                    with pm.disable_adapter(), torch.no_grad(), merge_lora(model, current):
                        model.eval()
                        record["val"] = float(validate(model))
                    record["val_seconds"] = time.perf_counter() - t0
                    if best[1] is None or record["val"] > best[1]:
                        best = (epoch, record["val"], weights)
                elif epoch == config.epochs:
                    best = (epoch, None, weights)
                history.append(record)
                if callable(progress):
                    progress(record)
            peft_cfg = _peft_config_dict(pm, model)
    finally:
        if bar is not None:
            bar.close()
        if pm is not None:
            pm.unload()
            for a in set(vars(model)) - attrs:
                delattr(model, a)
            if tp is not None:
                model.config.pretraining_tp = tp
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(flags[n])
        model.train(was_training)
    return LoRAResult(best[2], config.scaling, peft_cfg, best_epoch=best[0], best_val=best[1], history=history,
                      n_trainable_params=n_train, trainable_fraction=n_train / n_base, config=config.to_dict(),
                      seconds=time.perf_counter() - t_start)


def _adapter_weights(pm: Any, peft: Any) -> dict[str, torch.Tensor]:
    """The adapter's current state dict (peft key names), detached CPU copies."""
    return {k: v.detach().to("cpu", copy=True) for k, v in peft.get_peft_model_state_dict(pm).items()}


def _peft_config_dict(pm: Any, model: nn.Module) -> dict[str, Any]:
    """What ``PeftModel.save_pretrained`` writes as ``adapter_config.json``."""
    cfg = pm.peft_config["default"]
    d = cfg.to_dict()
    d = {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}
    d["inference_mode"] = True
    d["base_model_name_or_path"] = d.get("base_model_name_or_path") or getattr(model.config, "_name_or_path", None)
    return json.loads(json.dumps(d, default=str))


def _bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc="lora", unit="step")
