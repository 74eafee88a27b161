"""cca_fast: Constructive Circuit Amplification (arXiv 2512.16914) on Hugging Face causal LMs.

What a user imports lives here; everything else is in its subpackage (result types, batches,
reference implementations, helpers: see the README's architecture map).

* models: :func:`load_model`, :class:`ComponentSpace` (every q/k/v head and MLP neuron),
  :func:`scale_components`, :func:`read_components`
* data and evaluation: :func:`load_problems`, :func:`split_problems`, :class:`PromptConfig`,
  :func:`evaluate`; generation: :class:`GenerationConfig` (text stop rules passed in, e.g.
  :func:`paper_stops`), :func:`generate`, :class:`PrefixCache`
* stage 1: :class:`TraceConfig`, :func:`collect_traces`, :func:`pivot_for_pair`
* stage 2: :class:`PivotExample`, :func:`collate`, :func:`attribute` (gradient x activation, any
  metric), :func:`attribute_dataset` with an :class:`AttributeConfig` (``cca attribute``: every
  head and neuron over a data set, resumable, under torchrun), :func:`run_atp`, :func:`run_dcm`, :func:`select`
* stage 3: :func:`run_update` -> :class:`SparseDelta` (:func:`apply_delta`, :func:`revert_delta`,
  :func:`merge_delta`)
* everything: :func:`run_cca` with a :class:`RunConfig` (the ``cca run`` command: typed nested
  configurations, the same defaults)
* does it work: :func:`run_study` with a :class:`StudyConfig` (``cca study``): controls, the LoRA
  baseline (:func:`train_lora`, :func:`load_lora`, :func:`merge_lora`), side-effect suites
  (:func:`run_suites`)
* errors: :class:`CCAError` (bad input, with the fix), :class:`KernelError` (from the kernels)
"""
from cca_fast.attribution import attribute
from cca_fast.attribution_dataset import AttributeConfig, attribute_dataset
from cca_fast.baselines.lora.train import LoRAConfig, load_lora, merge_lora, train_lora
from cca_fast.data import load_problems, split_problems
from cca_fast.delta import SparseDelta, apply_delta, merge_delta, revert_delta
from cca_fast.errors import CCAError, KernelError
from cca_fast.evaluation.evaluate import evaluate
from cca_fast.evaluation.prompting import PromptConfig, paper_stops
from cca_fast.evaluation.suites import SuiteConfig, run_suites
from cca_fast.experiments.config import GenerationSettings
from cca_fast.experiments.pipeline import RunConfig, run_cca
from cca_fast.experiments.study import StudyConfig, run_study
from cca_fast.generation.decode import GenerationConfig, generate
from cca_fast.generation.prefix import PrefixCache
from cca_fast.models import ComponentSpace
from cca_fast.models.hooks import read_components, scale_components
from cca_fast.models.loading import load_model
from cca_fast.stages.examples import PivotExample, collate
from cca_fast.stages.localize.atp import AtPConfig, run_atp
from cca_fast.stages.localize.dcm import DCMConfig, run_dcm
from cca_fast.stages.localize.select import select
from cca_fast.stages.pivots.search import pivot_for_pair
from cca_fast.stages.traces import TraceConfig, collect_traces
from cca_fast.stages.update import UpdateConfig, run_update

from cca_fast.version import __version__  # noqa: E402
__all__ = [
    "load_model", "ComponentSpace", "scale_components", "read_components",
    "load_problems", "split_problems", "PromptConfig", "paper_stops", "evaluate",
    "GenerationConfig", "generate", "PrefixCache",
    "TraceConfig", "collect_traces", "pivot_for_pair",
    "PivotExample", "collate", "attribute", "attribute_dataset", "AttributeConfig", "AtPConfig", "run_atp", "DCMConfig", "run_dcm", "select",
    "UpdateConfig", "run_update", "SparseDelta", "apply_delta", "revert_delta", "merge_delta",
    "RunConfig", "GenerationSettings", "run_cca",
    "StudyConfig", "run_study", "LoRAConfig", "train_lora", "load_lora", "merge_lora", "SuiteConfig", "run_suites",
    "CCAError", "KernelError", "__version__",
]
