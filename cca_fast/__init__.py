"""cca_fast: Constructive Circuit Amplification (arXiv 2512.16914) on Hugging Face causal LMs.

What a user imports lives here; everything else is in its subpackage (helpers, reference
implementations: see the README's architecture map). The names are loaded on first use (PEP 562),
so ``import cca_fast`` (and ``import cca_fast.kernels``, which loads nothing else of the
library) stays cheap.

* models: :func:`load_model`, :class:`ComponentSpace` (every q/k/v head and MLP neuron, as
  :class:`Component`), :func:`scale_components`, :func:`read_components`; wrapped models (peft,
  ``torch.compile``, your own module holding the model) are unwrapped by
  :func:`unwrap_model`
* data and evaluation: :func:`load_problems`, :func:`split_problems`, :class:`PromptConfig`,
  :func:`evaluate` (-> :class:`EvalResult`); generation: :class:`GenerationConfig` (text stop
  rules passed in, e.g. :func:`paper_stops`), :func:`generate`, :class:`PrefixCache`
* stage 1: :class:`TraceConfig`, :func:`collect_traces`, :func:`pivot_for_pair`
* stage 2: :class:`PivotExample`, :func:`collate` (-> :class:`PivotBatch`), :func:`attribute`
  (gradient x activation, any metric, -> :class:`Attribution`), :func:`attribute_dataset` with an
  :class:`AttributeConfig` (``cca attribute``, -> :class:`DatasetAttribution`), :func:`run_atp`, :func:`run_dcm` (->
  :class:`DCMResult`), :func:`select` (-> :class:`Selection`)
* stage 3: :func:`run_update` (a built-in objective or your ``loss(model, batch)``; ->
  :class:`UpdateResult`) -> :class:`SparseDelta` (:func:`apply_delta` -> :class:`DeltaHandle`,
  :func:`revert_delta`, :func:`merge_delta`); gold solutions for ``gold_nll``:
  :class:`SFTExample`
* everything: :func:`run_cca` with a :class:`RunConfig` (the ``cca run`` command, ->
  :class:`RunReport`)
* does it work: :func:`run_study` with a :class:`StudyConfig` (``cca study``): controls, the LoRA
  baseline (:func:`train_lora` -> :class:`LoRAResult`, :func:`load_lora`, :func:`merge_lora`), side-effect suites
  (:func:`run_suites`)
* errors: :class:`CCAError` (bad input, with the fix), :class:`KernelError` (from the kernels)
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it (imported on first access)
_EXPORTS: dict[str, str] = {
    # models
    "load_model": "cca_fast.models.loading",
    "ComponentSpace": "cca_fast.models.components",
    "Component": "cca_fast.models.components",
    "scale_components": "cca_fast.models.hooks",
    "read_components": "cca_fast.models.hooks",
    "unwrap_model": "cca_fast.models.runtime",
    # data, evaluation, generation
    "load_problems": "cca_fast.data",
    "split_problems": "cca_fast.data",
    "PromptConfig": "cca_fast.evaluation.prompting",
    "paper_stops": "cca_fast.evaluation.prompting",
    "evaluate": "cca_fast.evaluation.evaluate",
    "EvalResult": "cca_fast.evaluation.evaluate",
    "GenerationConfig": "cca_fast.generation.decode",
    "generate": "cca_fast.generation.decode",
    "PrefixCache": "cca_fast.generation.prefix",
    # stage 1
    "TraceConfig": "cca_fast.stages.traces",
    "collect_traces": "cca_fast.stages.traces",
    "pivot_for_pair": "cca_fast.stages.pivots.search",
    # stage 2
    "PivotExample": "cca_fast.stages.examples",
    "PivotBatch": "cca_fast.stages.examples",
    "collate": "cca_fast.stages.examples",
    "attribute": "cca_fast.attribution",
    "Attribution": "cca_fast.attribution",
    "attribute_dataset": "cca_fast.attribution_dataset",
    "AttributeConfig": "cca_fast.attribution_dataset",
    "DatasetAttribution": "cca_fast.attribution_dataset",
    "AtPConfig": "cca_fast.stages.localize.atp",
    "run_atp": "cca_fast.stages.localize.atp",
    "DCMConfig": "cca_fast.stages.localize.dcm",
    "DCMResult": "cca_fast.stages.localize.dcm",
    "run_dcm": "cca_fast.stages.localize.dcm",
    "select": "cca_fast.stages.localize.select",
    "Selection": "cca_fast.stages.localize.select",
    # stage 3
    "UpdateConfig": "cca_fast.stages.update",
    "UpdateResult": "cca_fast.stages.update",
    "run_update": "cca_fast.stages.update",
    "SFTExample": "cca_fast.baselines.lora.sft",
    "SparseDelta": "cca_fast.delta",
    "DeltaHandle": "cca_fast.delta",
    "apply_delta": "cca_fast.delta",
    "revert_delta": "cca_fast.delta",
    "merge_delta": "cca_fast.delta",
    # everything, the study, the LoRA baseline, side effects
    "RunConfig": "cca_fast.experiments.pipeline",
    "run_cca": "cca_fast.experiments.pipeline",
    "RunReport": "cca_fast.experiments.pipeline",
    "GenerationSettings": "cca_fast.experiments.config",
    "StudyConfig": "cca_fast.experiments.study",
    "run_study": "cca_fast.experiments.study",
    "LoRAConfig": "cca_fast.baselines.lora.train",
    "train_lora": "cca_fast.baselines.lora.train",
    "LoRAResult": "cca_fast.baselines.lora.train",
    "load_lora": "cca_fast.baselines.lora.train",
    "merge_lora": "cca_fast.baselines.lora.train",
    "SuiteConfig": "cca_fast.evaluation.suites",
    "run_suites": "cca_fast.evaluation.suites",
    # errors
    "CCAError": "cca_fast.errors",
    "KernelError": "cca_fast.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first access (then cache it here)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cca_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs; the runtime loads lazily
    from cca_fast.attribution import Attribution, attribute
    from cca_fast.attribution_dataset import AttributeConfig, DatasetAttribution, attribute_dataset
    from cca_fast.baselines.lora.sft import SFTExample
    from cca_fast.baselines.lora.train import LoRAConfig, LoRAResult, load_lora, merge_lora, train_lora
    from cca_fast.data import load_problems, split_problems
    from cca_fast.delta import DeltaHandle, SparseDelta, apply_delta, merge_delta, revert_delta
    from cca_fast.errors import CCAError, KernelError
    from cca_fast.evaluation.evaluate import EvalResult, evaluate
    from cca_fast.evaluation.prompting import PromptConfig, paper_stops
    from cca_fast.evaluation.suites import SuiteConfig, run_suites
    from cca_fast.experiments.config import GenerationSettings
    from cca_fast.experiments.pipeline import RunConfig, RunReport, run_cca
    from cca_fast.experiments.study import StudyConfig, run_study
    from cca_fast.generation.decode import GenerationConfig, generate
    from cca_fast.generation.prefix import PrefixCache
    from cca_fast.models.components import Component, ComponentSpace
    from cca_fast.models.hooks import read_components, scale_components
    from cca_fast.models.loading import load_model
    from cca_fast.models.runtime import unwrap_model
    from cca_fast.stages.examples import PivotBatch, PivotExample, collate
    from cca_fast.stages.localize.atp import AtPConfig, run_atp
    from cca_fast.stages.localize.dcm import DCMConfig, DCMResult, run_dcm
    from cca_fast.stages.localize.select import Selection, select
    from cca_fast.stages.pivots.search import pivot_for_pair
    from cca_fast.stages.traces import TraceConfig, collect_traces
    from cca_fast.stages.update import UpdateConfig, UpdateResult, run_update
