"""cca_fast: Constructive Circuit Amplification (arXiv 2512.16914) on Hugging Face causal LMs.

The stages as plain functions (see README for the data flow):

* models: :func:`load_model`, :class:`ComponentSpace` (every q/k/v head and MLP neuron)
* data: :func:`load_problems`, :func:`split_problems`; prompting and :func:`evaluate`
* stage 1: :func:`collect_traces`, :func:`pivot_for_pair` (prefix / branching)
* stage 2: :func:`attribute` (gradient x activation, any metric), :func:`run_atp`, :func:`run_dcm`, :func:`select`
* stage 3: :func:`run_update` -> :class:`SparseDelta` (:func:`apply_delta`, :func:`revert_delta`, :func:`merge_delta`)
* everything: :func:`run_cca` with a :class:`RunConfig` (the ``cca run`` command; typed nested
  configurations, the same defaults), returning a :class:`RunReport`
* does it work: :func:`run_study` with a :class:`StudyConfig` (``cca study``): controls, the LoRA
  baseline (:func:`train_lora`, :func:`merge_lora`), side-effect suites (:func:`run_suites`)
"""
from cca_fast.attribution import Attribution, AttributionSession, attribute, attribute_by_caching
from cca_fast.data import load_problems, split_problems
from cca_fast.data.problem import Problem
from cca_fast.delta import SparseDelta, apply_delta, merge_delta, revert_delta
from cca_fast.errors import CCAError, KernelError
from cca_fast.evaluation.evaluate import EvalResult, evaluate
from cca_fast.stages.examples import PivotBatch, PivotExample, collate, logit_diff
from cca_fast.generation.decode import GenerationConfig, generate
from cca_fast.generation.prefix import PrefixCache
from cca_fast.models.hooks import read_components, scale_components
from cca_fast.stages.localize.atp import AtPConfig, run_atp
from cca_fast.stages.localize.dcm import DCMConfig, DCMResult, run_dcm
from cca_fast.stages.localize.select import Selection, select
from cca_fast.baselines.lora.train import LoRAConfig, LoRAResult, load_lora, merge_lora, train_lora
from cca_fast.models import Component, ComponentSpace, get_adapter, supported_model_types
from cca_fast.models.loading import load_model
from cca_fast.experiments.config import GenerationSettings
from cca_fast.experiments.pipeline import RunConfig, run_cca
from cca_fast.experiments.report import RunReport
from cca_fast.stages.pivots.search import pivot_for_pair
from cca_fast.evaluation.prompting import PromptConfig, build_prompt, extract_answer
from cca_fast.evaluation.stats import StratifiedBootstrap
from cca_fast.experiments.study import StudyConfig, run_study
from cca_fast.evaluation.suites import SuiteConfig, run_suites
from cca_fast.stages.traces import TraceConfig, collect_traces
from cca_fast.stages.update import UpdateConfig, UpdateResult, run_update

__version__ = "0.1.0"
__all__ = [
    "Attribution", "AttributionSession", "attribute", "attribute_by_caching",
    "load_problems", "split_problems", "Problem",
    "SparseDelta", "apply_delta", "merge_delta", "revert_delta",
    "CCAError", "KernelError", "EvalResult", "evaluate",
    "PivotBatch", "PivotExample", "collate", "logit_diff",
    "GenerationConfig", "generate", "PrefixCache", "read_components", "scale_components",
    "AtPConfig", "run_atp", "DCMConfig", "DCMResult", "run_dcm", "Selection", "select",
    "Component", "ComponentSpace", "get_adapter", "supported_model_types", "load_model",
    "RunConfig", "GenerationSettings", "RunReport", "run_cca", "pivot_for_pair", "PromptConfig", "build_prompt", "extract_answer",
    "TraceConfig", "collect_traces", "UpdateConfig", "UpdateResult", "run_update",
    "LoRAConfig", "LoRAResult", "load_lora", "merge_lora", "train_lora",
    "StratifiedBootstrap", "StudyConfig", "run_study", "SuiteConfig", "run_suites", "__version__",
]
