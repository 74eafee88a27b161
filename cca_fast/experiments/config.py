"""The configuration of a ``cca run``: :class:`RunConfig`, typed and checked on construction.

``RunConfig`` holds the run's scalar settings and one typed configuration per part of the method:

==============  ===================================================================
``prompt``      :class:`~cca_fast.evaluation.prompting.PromptConfig` (mode, exemplars, shots)
``generation``  :class:`GenerationSettings` (greedy decoding of every evaluation)
``trace``       :class:`~cca_fast.stages.traces.TraceConfig` (stage 1 sampling)
``dcm``         :class:`~cca_fast.stages.localize.dcm.DCMConfig` (stage 2, ``selector="dcm"``)
``fork``        :class:`~cca_fast.stages.pivots.fork.ForkConfig` (greedy-path forking pivots)
``update``      :class:`~cca_fast.stages.update.UpdateConfig` (stage 3)
==============  ===================================================================

The defaults are written once, here: the ``cca run`` flags read theirs from ``RunConfig()``
(``cca study`` from ``StudyConfig().run``), so ``run_cca(RunConfig(seed=1))`` and
``cca run --seed 1`` are the same run. Child seeds (``trace.seed``, ``dcm.seed``) are derived
from ``RunConfig.seed`` in :meth:`RunConfig.__post_init__`, the one place that sets them.

:func:`procedure_settings` gives the settings a run actually uses after ``procedure``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cca_fast.errors import CCAError
from cca_fast.evaluation.prompting import PromptConfig
from cca_fast.experiments import config_io
from cca_fast.evaluation.prompting import paper_stops
from cca_fast.generation.decode import GenerationConfig
from cca_fast.stages.localize.dcm import DCMConfig
from cca_fast.stages.pivots.fork import ForkConfig
from cca_fast.stages.traces import TraceConfig
from cca_fast.stages.update import UpdateConfig

SELECTORS = ("dcm", "atp-topk", "atp-fraction", "random", "none", "fisher", "grad-weight", "movement")
#: selectors scored on the gold-solution loss (:mod:`cca_fast.stages.localize.objective_scores`),
#: always ranked within each kind
OBJECTIVE_SELECTORS = ("fisher", "grad-weight", "movement")
PROCEDURES = ("fast", "reference")
PIVOT_METHODS = ("branching", "prefix")
BRANCHINGS = ("fast", "reference")
#: where stage 3's training pivots come from: the paper's (``pivot_method`` on sampled traces),
#: greedy-path forks, or both
PIVOT_SOURCES = ("paper", "fork", "both")
#: which pivots train: all, or only those whose desired token is not already the argmax
PIVOT_FILTERS = ("all", "not_argmax")


@dataclass
class GenerationSettings:
    """Greedy decoding of every evaluation and completion of a run.

    Attributes:
        max_new_tokens: new tokens per answer at most (the paper uses 1500; 160 suits CPU runs).
        batch_size: sequences decoded together by the padded-batch decoder, and the batch of the
            attribution and pivot stages.
        slots: sequences the slot decoder (every generation of a run, where the model allows it)
            decodes together; evaluation chunks and trace groups are sized by it.
        compute_dtype: ``"float32"`` (default, token-identical to the batch-1 reference) or
            ``"bfloat16"`` (opt-in, ``--generation-dtype bfloat16``): every generation of the run
            computes its matrix products in bf16 (autocast; training and attribution stay as
            they are); not token-identical. Measured speed and token agreement: see
            :attr:`~cca_fast.generation.decode.GenerationConfig.compute_dtype`.
        continuous: ``True`` (default): the slot decoder (continuous batching, the exemplars
            stored once) wherever the model allows it; ``False``: padded batches of
            ``batch_size`` rows for every generation (same greedy tokens, slower; kept for
            comparisons and for models the slot decoder does not take).
    """

    max_new_tokens: int = 160
    batch_size: int = 8
    #: measured on the default run's base-evaluation prompts (2-core CPU, fp32 SmolLM2-135M): a
    #: decode step costs ~75 ms at 1 slot, ~17 ms a row at 8 slots, ~6.5 at 32, ~5 at 64, ~4 at 128
    #: (the weights are read once a step for every slot); the whole base evaluation (238 problems)
    #: took 118.8 s at 32 slots and 82.7 s at 64 with the same tokens, and, with both splits in one
    #: chunk, 65.9-67.8 s at 128 slots vs 69.9-70.4 s at 64 (1.07x vs two chunks at 64 slots, paired
    #: runs). A slot holds only its own key/values (the exemplars are stored once): 128 slots of
    #: 160 + ~50 positions take 1.24 GB (fewer are used beyond ``slots.SLOT_CACHE_BYTES``)
    slots: int = 128
    compute_dtype: str = "float32"
    continuous: bool = True

    def __post_init__(self) -> None:
        from cca_fast import checks
        from cca_fast.generation.decode import check_compute_dtype

        for name in ("max_new_tokens", "batch_size", "slots"):
            checks.positive(f"GenerationSettings.{name}", getattr(self, name), flag=f"--{name.replace('_', '-')}")
        check_compute_dtype("GenerationSettings.compute_dtype", self.compute_dtype, flag="--generation-dtype")

    def config(self) -> GenerationConfig:
        """The :class:`~cca_fast.generation.decode.GenerationConfig` of these settings, with the
        paper's stop rules (:func:`~cca_fast.evaluation.prompting.paper_stops`)."""
        return GenerationConfig(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, slots=self.slots,
                                stops=paper_stops(), compute_dtype=self.compute_dtype,
                                continuous=self.continuous)


def _default_dcm() -> DCMConfig:
    # "last" mode keeps each batch's prefix K/V for the whole run (memory for speed; exact)
    return DCMConfig(reuse_prefix_cache=True)


def _default_update() -> UpdateConfig:
    return UpdateConfig(max_steps=8)  # CPU-sized; the paper uses 50


#: nested configuration fields and their types (checked by :meth:`RunConfig.validate`)
NESTED = {"prompt": PromptConfig, "generation": GenerationSettings, "trace": TraceConfig, "dcm": DCMConfig,
          "fork": ForkConfig, "update": UpdateConfig}


@dataclass
class RunConfig:
    """Everything that determines a run's results (written to ``config.json``).

    The defaults are sized for the embedded default model on 2 CPU cores (well under 20 minutes);
    see the README for the paper-size configuration. Construction checks every value
    (:meth:`validate`); build one from a dict (``config.json``, overrides) with :meth:`from_dict`.

    Attributes:
        output: the run directory (``config.json`` may differ only in it).
        model, dtype, device, attn_implementation: what :func:`~cca_fast.models.loading.load_model` loads.
        data: the data source (``None``: the built-in templates); ``n_per_template`` instances each.
        skip_bad_templates: a template folder's bad templates are left out (each reported on the
            ``cca_fast.data`` logger with its reason) instead of stopping the run.
        integer_answers: template instances must have an integer ``#answer`` (GSM8K's answers are).
        seed: the seed of everything: instances, splits, subsets, stage-1 samples
            (``trace.seed``), DCM's shuffles (``dcm.seed``) and the random control.
        extra_train_data: a second data source (anything ``data`` accepts, e.g. GSM8K's
            ``train.jsonl``) whose problems join the training split only, never validation or
            test (``None``: none; loaded with the same ``n_per_template``, ``seed`` and template
            options). Their ids get the prefix ``extra:`` and their template is
            ``extra:<template>`` (``extra`` when they have none), so they are their own groups in
            per-template accuracy. They enter stage 1 like the main training problems: all are
            base-evaluated, a group is used when its base training accuracy is below
            ``weak_threshold`` (with no templates in either source, every problem is), and the
            pooled problems are capped by ``max_train_problems`` (raise it, or 0 = all, to train
            on more of them). Extra problems whose question is one of the main data's are left
            out, and ``val_from_train`` never draws them. ``gold_nll`` trains on their gold
            solutions too.
        extra_train_max: at most this many extra problems (a draw seeded by ``seed``; ``None``:
            all). Every one is base-evaluated, so this bounds the added cost.
        extra_test_data, extra_test_max: the same for the test split: every problem of this
            source (at most ``extra_test_max``, a seeded draw) joins the test split only (ids
            ``extra:``, their own template groups), e.g. GSM8K's ``test.jsonl`` beside the built-in
            templates for a test split of over 1,300 problems. ``max_test_problems`` caps the
            whole test split after.
        weak_threshold: templates with base training accuracy below it give training examples.
        max_train_problems, max_val_problems, max_test_problems: caps (``None``: all). The
            default 34 validation problems (the whole validation split of the built-in templates
            at 8 instances each: one per template) make one problem 2.9 points of validation
            accuracy (12 made it 8.3); equal accuracies are decided by the validation problems'
            gold-solution log-likelihood (:class:`~cca_fast.experiments.steps.update.UpdateStep`).
        prompt, generation, trace, dcm, update: the nested configurations (module docstring).
            The default ``dcm`` differs from ``DCMConfig()`` in ``reuse_prefix_cache=True`` and
            the default ``update`` from ``UpdateConfig()`` in ``max_steps=8``.
        pivot_method: ``"branching"`` or ``"prefix"``; ``branching``: ``"fast"`` or ``"reference"``.
        pivot_source: the training pivots (:data:`PIVOT_SOURCES`): ``"paper"`` (``pivot_method``
            on the sampled flipped traces), ``"fork"`` (greedy-path forking pivots of the
            training problems, settings in ``fork``) or ``"both"``.
        pivot_filter: ``"all"`` or ``"not_argmax"`` (drop pivots whose desired token is already
            the base model's argmax: raising its margin cannot change greedy decoding there).
        val_from_train: validation also takes this many training-split problems that stage 1 did
            not use (seeded; 0 = the validation split only), so that one problem is a smaller step
            of validation accuracy.
        diagnostics: write ``diagnostics.json`` before stage 3 (pivot table, gradient alignment,
            leave-fold-out transfer, gold-loss alignment; :mod:`cca_fast.experiments.diagnostics`).
        selector: one of :data:`SELECTORS`; ``select_k`` (atp-topk), ``select_fraction``
            (atp-fraction, random; for fisher / grad-weight / movement the same fraction of every
            kind), ``select_count`` (random), ``select_kinds`` (random: a count per
            kind, ``{"q": 4, "k": 3, "v": 0, "mlp": 924}``, which matches parameters too).
            ``fisher``, ``grad-weight``, ``movement`` score the training problems' gold-solution
            loss (:mod:`cca_fast.stages.localize.objective_scores`; movement's dense fine-tune
            takes ``update``'s optimizer and lr, at most 3 steps).
        select_per_kind: a budget per kind, ``{"q": 0.05, "k": 0.05, "v": 0.05, "mlp": 0.01}``
            (fractions of each kind's heads / neurons; ``--select-per-kind``): atp-fraction and the
            objective selectors rank within each kind; random draws those counts.
        select_anti: the anti-selection control: the lowest-ranked components at the same
            per-kind counts (atp-fraction with ``select_per_kind``, and the objective selectors).
        select_layer_kinds: random: a count per kind *per layer*, ``{"q": [count in layer 0, ...],
            ...}`` (the layer-and-kind matched control of a study).
        select_seed: the random draw's own seed (``None``: ``seed``), so that a study draws many
            random controls on the same splits, traces and pivots.
        procedure: ``"fast"`` or ``"reference"`` (see :class:`ProcedureSettings`).
    """

    output: str = "runs/cca"
    model: str | None = None
    dtype: str | None = None
    device: str | None = None
    attn_implementation: str = "sdpa"
    data: str | None = None
    n_per_template: int = 8
    skip_bad_templates: bool = False
    integer_answers: bool = True
    seed: int = 0
    weak_threshold: float = 0.8
    extra_train_data: str | None = None
    extra_train_max: int | None = None
    extra_test_data: str | None = None
    extra_test_max: int | None = None
    max_train_problems: int | None = 12
    max_val_problems: int | None = 34
    max_test_problems: int | None = None
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    trace: TraceConfig = field(default_factory=TraceConfig)
    pivot_method: str = "branching"
    branching: str = "fast"
    selector: str = "dcm"
    select_k: int | None = None
    select_fraction: float | None = None
    select_count: int | None = None
    select_kinds: dict[str, int] | None = None
    select_per_kind: dict[str, float] | None = None
    select_anti: bool = False
    select_layer_kinds: dict[str, list[int]] | None = None
    select_seed: int | None = None
    dcm: DCMConfig = field(default_factory=_default_dcm)
    update: UpdateConfig = field(default_factory=_default_update)
    procedure: str = "fast"
    pivot_source: str = "paper"
    pivot_filter: str = "all"
    fork: ForkConfig = field(default_factory=ForkConfig)
    val_from_train: int = 0
    diagnostics: bool = True

    def __post_init__(self) -> None:
        self._check_types()
        # the one place child seeds are set: every seeded part of the run follows RunConfig.seed
        self.trace = dataclasses.replace(self.trace, seed=self.seed)
        self.dcm = dataclasses.replace(self.dcm, seed=self.seed)
        self.validate()

    # ---- dicts ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-able nested dict (what ``config.json`` holds)."""
        return config_io.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base: "RunConfig | None" = None) -> "RunConfig":
        """``base`` (default ``RunConfig()``) with the fields in ``data`` replaced (nested dicts
        merged into the nested configurations). Raises :class:`CCAError` on an unknown key."""
        return config_io.from_dict(cls, data, base=base)

    # ---- checks -----------------------------------------------------------------------------
    def _check_types(self) -> None:
        for name, kind in NESTED.items():
            value = getattr(self, name)
            if not isinstance(value, kind):
                raise CCAError(f"RunConfig.{name} must be a {kind.__name__}, got {type(value).__name__}: pass "
                               f"{kind.__name__}(...), or build the whole configuration from a dict with "
                               f"RunConfig.from_dict({{'{name}': {{...}}}})")

    def validate(self) -> None:
        """Raise :class:`CCAError` naming the field and the fix if a setting is invalid (run by
        the constructor, and by :func:`~cca_fast.experiments.pipeline.run_cca` before any work)."""
        self._check_types()
        if not isinstance(self.output, str) or not self.output.strip():
            raise CCAError(f"RunConfig.output (--output) must name the run directory, got {self.output!r}; "
                           "e.g. runs/cca")
        if self.selector not in SELECTORS:
            raise CCAError(f"unknown selector {self.selector!r} (RunConfig.selector, --selector); "
                           f"choose one of {', '.join(SELECTORS)}")
        if self.pivot_method not in PIVOT_METHODS:
            raise CCAError(f"unknown pivot method {self.pivot_method!r} (RunConfig.pivot_method, --pivot-method); "
                           "use 'branching' or 'prefix'")
        if self.branching not in BRANCHINGS:
            raise CCAError(f"unknown branching implementation {self.branching!r} (RunConfig.branching, "
                           "--branching); use 'fast' or 'reference'")
        if self.pivot_source not in PIVOT_SOURCES:
            raise CCAError(f"unknown pivot source {self.pivot_source!r} (RunConfig.pivot_source, --pivot-source); "
                           f"choose one of {', '.join(PIVOT_SOURCES)}")
        if self.pivot_filter not in PIVOT_FILTERS:
            raise CCAError(f"unknown pivot filter {self.pivot_filter!r} (RunConfig.pivot_filter, --pivot-filter); "
                           f"choose one of {', '.join(PIVOT_FILTERS)}")
        from cca_fast import checks

        checks.integer("RunConfig.val_from_train", self.val_from_train, flag="--val-from-train", lo=0)
        checks.seed("RunConfig.seed", self.seed)
        self._check_extra("train", "training")
        self._check_extra("test", "test")
        if self.procedure not in PROCEDURES:
            raise CCAError(f"unknown procedure {self.procedure!r} (RunConfig.procedure, --procedure); use 'fast' "
                           "(the default fast paths) or 'reference' (the authors' procedure, for comparisons)")
        self._check_values()
        if self.selector == "atp-topk" and not self.select_k:
            raise CCAError("selector atp-topk needs RunConfig.select_k (--select-k K)")
        if self.selector == "atp-fraction" and not self.select_fraction:
            raise CCAError("selector atp-fraction needs RunConfig.select_fraction (--select-fraction F)")
        if self.select_kinds is not None:
            from cca_fast.models.adapters import KINDS

            if (not isinstance(self.select_kinds, dict) or set(self.select_kinds) - set(KINDS)
                    or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in self.select_kinds.values())):
                raise CCAError(f"RunConfig.select_kinds must map {', '.join(KINDS)} to integers >= 0, got "
                               f"{self.select_kinds!r}")
        if self.select_seed is not None:
            checks.seed("RunConfig.select_seed", self.select_seed, flag=None)
        if self.select_layer_kinds is not None and self.selector != "random":
            raise CCAError("RunConfig.select_layer_kinds (per-layer counts) is the random control's: selector random")
        if self.select_per_kind is not None:
            from cca_fast.models.adapters import KINDS

            checks.kind_budget("RunConfig.select_per_kind", self.select_per_kind, KINDS)
            if self.selector not in ("atp-fraction", "random", *OBJECTIVE_SELECTORS):
                raise CCAError(f"RunConfig.select_per_kind (--select-per-kind) is a budget for atp-fraction, random, "
                               f"{', '.join(OBJECTIVE_SELECTORS)}; selector {self.selector!r} does not take it")
        if self.selector in OBJECTIVE_SELECTORS and not (self.select_per_kind or self.select_fraction):
            raise CCAError(f"selector {self.selector} needs a budget: RunConfig.select_per_kind (--select-per-kind "
                           "q=0.05,k=0.05,v=0.05,mlp=0.01) or select_fraction (--select-fraction F: F of every kind)")
        if self.select_anti and not (self.selector in OBJECTIVE_SELECTORS
                                     or (self.selector == "atp-fraction" and self.select_per_kind)):
            raise CCAError("RunConfig.select_anti (--anti) takes the lowest-ranked components per kind: it needs "
                           f"selector {', '.join(OBJECTIVE_SELECTORS)} or atp-fraction with --select-per-kind")
        if self.selector == "random" and not (self.select_count or self.select_fraction or self.select_kinds
                                              or self.select_per_kind or self.select_layer_kinds):
            raise CCAError("selector random needs RunConfig.select_count (--select-count N) or select_fraction "
                           "(--select-fraction F): use the count of the selection it controls for")
        _positive("n_per_template", self.n_per_template)
        _positive("trace.k", self.trace.k, flag="--k")
        _positive("trace.sample_batch", self.trace.sample_batch, flag=None)
        _positive("update.max_steps", self.update.max_steps, flag="--update-steps")
        for name in ("max_train_problems", "max_val_problems", "max_test_problems"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name), extra="or None for all (0 on the command line)")
        self.update.check()

    def _check_extra(self, split: str, what: str) -> None:
        """``extra_<split>_data`` is ``None`` or a non-empty source; ``extra_<split>_max`` is
        ``None`` or a positive integer, and only with ``extra_<split>_data``."""
        data, cap = getattr(self, f"extra_{split}_data"), getattr(self, f"extra_{split}_max")
        flag = f"--extra-{split}-data"
        if data is not None and (not isinstance(data, str) or not data.strip()):
            raise CCAError(f"RunConfig.extra_{split}_data ({flag}) must be a data source (a file, a "
                           f"template folder or a hub name), got {data!r}; None for none")
        if cap is not None:
            _positive(f"extra_{split}_max", cap, extra="or None for all (0 on the command line)")
            if data is None:
                raise CCAError(f"RunConfig.extra_{split}_max (--extra-{split}-max) caps the extra {what} problems: "
                               f"it needs extra_{split}_data ({flag} D)")

    def _check_values(self) -> None:
        """Ranges of the scalar fields (NaN and infinities refused: see :mod:`cca_fast.checks`)."""
        from cca_fast import checks
        from cca_fast.models.loading import DTYPE_NAMES

        checks.integer("RunConfig.select_k", self.select_k, flag="--select-k", allow_none=True,
                       hint="the number of top-scored components atp-topk keeps")
        checks.number("RunConfig.select_fraction", self.select_fraction, flag="--select-fraction", lo=0, hi=1,
                      lo_open=True, allow_none=True,
                      hint="a fraction of all components, e.g. 0.02 for 2%")
        checks.integer("RunConfig.select_count", self.select_count, flag="--select-count", allow_none=True,
                       hint="the number of components the random control draws")
        checks.number("RunConfig.weak_threshold", self.weak_threshold, flag="--weak-threshold", lo=0,
                      hint="an accuracy such as 0.8 (above 1: every template gives training examples)")
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            raise CCAError(f"RunConfig.model (--model) must be a hub id, a directory or a .gguf file, got "
                           f"{self.model!r}; leave it unset (None) for the embedded default model")
        if self.dtype is not None and (not isinstance(self.dtype, str) or self.dtype.lower() not in DTYPE_NAMES):
            raise CCAError(f"RunConfig.dtype (--dtype) is an unknown dtype {self.dtype!r}; use one of "
                           f"{', '.join(DTYPE_NAMES)}, or leave it unset for float32 on CPU and bfloat16 on GPU")

    def check_inputs(self) -> None:
        """The cheap checks of what the run will read, before anything is written or loaded
        (:func:`~cca_fast.experiments.pipeline.run_cca` runs them): the model is an existing
        path or looks like a hub id, the exemplar file exists and parses (and has ``n_shots``
        exemplars). Raises :class:`CCAError` naming the flag and the fix."""
        from cca_fast.models.loading import check_model_name

        check_model_name(self.model, flag="--model")
        try:
            self.prompt.shots()
        except CCAError as e:
            raise type(e)(f"{e} (RunConfig.prompt.exemplars / n_shots: --shots FILE, --n-shots K)") from None

    def check_model_size(self, total: int) -> None:
        """Refuse a selection larger than the model's ``total`` components (``select_count``,
        ``select_k``); run as soon as the model is loaded, before stage 1 and before
        ``config.json`` is written."""
        for name, flag, selector in (("select_count", "--select-count", "random"),
                                     ("select_k", "--select-k", "atp-topk")):
            value = getattr(self, name)
            if self.selector == selector and value is not None and value > total:
                raise CCAError(f"RunConfig.{name} ({flag}) is {value} but this model has only {total} components; "
                               f"pass at most {total} (or a fraction with --select-fraction)")


def _positive(name: str, value: Any, *, flag: str | None = "", extra: str = "") -> None:
    """:func:`cca_fast.checks.positive` of ``RunConfig.<name>`` (flag ``--<name>`` unless given)."""
    from cca_fast import checks

    checks.positive(f"RunConfig.{name}", value, flag="--" + name.replace("_", "-") if flag == "" else flag, hint=extra)


@dataclass(frozen=True)
class ProcedureSettings:
    """The stage settings a run actually uses, after ``RunConfig.procedure``.

    ``procedure="fast"``: the configuration as given. ``procedure="reference"``: the authors'
    procedure, the same results by the slow path (for benchmarks and checks), overriding:

    * generation: one sequence at a time (``batch_size=1``, ``slots=1``), no shared-prefix prefill, no early
      stop (``max_new_tokens`` decoded, the output cut where the stop rule would have stopped:
      the same generations, see :mod:`cca_fast.generation.decode`); the flipped-trace search draws its
      samples one at a time (``TraceConfig.sample_batch=1``; the first flip in order is kept
      either way);
    * pivots: the literal per-position branching loop (``branching="reference"``);
    * DCM: ``mode="full"`` (the whole prefix re-run at every step; no prefix cache exists in
      that mode, so ``reuse_prefix_cache`` only keeps fixing the batch schedule, which must be
      the fast run's for the same masks);
    * update: ``mode="reference"`` (dense gradients for every weight, selected rows copied),
      and ``share_prefix=False`` where :class:`~cca_fast.stages.update.UpdateConfig` has it.
    """

    generation: GenerationConfig
    trace: TraceConfig
    branching: str
    dcm: DCMConfig
    update: UpdateConfig


def procedure_settings(config: RunConfig) -> ProcedureSettings:
    """The effective stage settings of ``config`` (see :class:`ProcedureSettings`)."""
    gen = config.generation.config()
    if config.procedure != "reference":
        return ProcedureSettings(gen, config.trace, config.branching, config.dcm, config.update)
    update = dataclasses.replace(config.update, mode="reference")
    if "share_prefix" in config_io.init_fields(UpdateConfig):
        update = dataclasses.replace(update, share_prefix=False)
    return ProcedureSettings(
        generation=dataclasses.replace(gen, batch_size=1, slots=1, share_prefix=False, early_stop=False),
        trace=dataclasses.replace(config.trace, sample_batch=1),
        branching="reference",
        dcm=dataclasses.replace(config.dcm, mode="full"),
        update=update,
    )
