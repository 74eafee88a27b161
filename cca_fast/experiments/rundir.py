"""The run directory: the one place that names a run's files.

=========================  =====================================================================
``config.json``            the :class:`~cca_fast.experiments.config.RunConfig` (nested; a
                           resumed run must use the same one)
``data/{train,val,test}.jsonl``  the seeded per-template splits
``eval_base_train.jsonl``  greedy traces of the training split (records + token ids; resumable)
``eval_base_test.jsonl``   base model on the test split (resumable)
``training_set.json``      stage 1's training problems: weak templates and problem ids, in order
``traces.jsonl``           stage 1a: greedy trace + first flipped sample per training problem
``pivots.jsonl``           stage 1b: pivot examples (one line per trace pair; resumable)
``training_examples.json`` stage 3's training pivots (``pivot_source``, ``pivot_filter``) + counts
``selection.json``         stage 2: the selected components
``diagnostics.json``       why an update will or will not transfer (before stage 3)
``update.json``            stage 3: history, best step (the delta is in ``delta/``)
``delta/``                 the sparse delta (``delta_config.json`` + ``delta.safetensors``)
``eval_cca_test.jsonl``    the updated model (base + delta) on the test split (resumable)
``report.json``, ``report.md``, ``components.png``  the report
``stages.json``            seconds spent per stage
``model_identity.json``    the identity of the weights behind ``--model`` (checked on resume)
``made_with.json``         the configuration each step's outputs were made with (checked on resume)
``run.lock``               held by the one process writing the run (see :mod:`.lock`)
=========================  =====================================================================
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from cca_fast.errors import CCAError
from cca_fast.experiments.lock import LOCK_NAME, dir_lock
from cca_fast.io import add_seconds, atomic_write_json, check_or_write_config, read_json, refuse_links

if TYPE_CHECKING:
    from cca_fast.data.problem import Problem
    from cca_fast.experiments.config import RunConfig

SPLITS = ("train", "val", "test")


class _Folder:
    """A directory whose files are named by class attributes; ``LOCK`` is its one-writer lock,
    ``LINK_CHECKED`` the sub-folders (besides itself) refused when they hold a symbolic link."""

    LOCK = LOCK_NAME
    CREATE = True
    LINK_CHECKED: tuple[str, ...] = ()

    def __init__(self, path: str | Path, *, create: bool | None = None):
        self.path = Path(path)
        if self.CREATE if create is None else create:
            self.path.mkdir(parents=True, exist_ok=True)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @contextmanager
    def lock(self) -> Iterator[Path]:
        """Hold ``run.lock`` (one writer per directory) for a ``with`` block; a symbolic link in the
        directory (or as one of ``LINK_CHECKED``) is refused first: every write would follow it out
        of the folder."""
        with dir_lock(self.path) as path:
            refuse_links(self.path, self.LINK_CHECKED)
            yield path


class RunDir(_Folder):
    """Files of one run, by name (relative names in the class attributes, paths as properties);
    stage timings in ``stages.json``."""

    CONFIG = "config.json"
    BASE_TRAIN = "eval_base_train.jsonl"
    BASE_TEST = "eval_base_test.jsonl"
    TRAINING_SET = "training_set.json"
    TRACES = "traces.jsonl"
    PIVOTS = "pivots.jsonl"
    SELECTION = "selection.json"
    TRAINING_EXAMPLES = "training_examples.json"
    DIAGNOSTICS = "diagnostics.json"
    UPDATE = "update.json"
    DELTA = "delta"
    CCA_TEST = "eval_cca_test.jsonl"
    LOGLIK_TEST = "loglik_test.json"
    REPORT_JSON = "report.json"
    REPORT_MD = "report.md"
    COMPONENTS_PNG = "components.png"
    STAGES = "stages.json"
    MODEL_IDENTITY = "model_identity.json"
    MADE_WITH = "made_with.json"
    LINK_CHECKED = ("data", DELTA)

    @staticmethod
    def split_name(split: str) -> str:
        """The relative name of a data split's file (``data/train.jsonl``)."""
        if split not in SPLITS:
            raise CCAError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
        return f"data/{split}.jsonl"

    # ---- paths ---------------------------------------------------------------------------------
    def split(self, split: str) -> Path:
        return self.path / self.split_name(split)

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def base_train(self) -> Path:
        return self.path / self.BASE_TRAIN

    @property
    def base_test(self) -> Path:
        return self.path / self.BASE_TEST

    @property
    def training_set_file(self) -> Path:
        return self.path / self.TRAINING_SET

    @property
    def traces(self) -> Path:
        return self.path / self.TRACES

    @property
    def pivots(self) -> Path:
        return self.path / self.PIVOTS

    @property
    def training_examples(self) -> Path:
        return self.path / self.TRAINING_EXAMPLES

    @property
    def diagnostics(self) -> Path:
        return self.path / self.DIAGNOSTICS

    @property
    def selection(self) -> Path:
        return self.path / self.SELECTION

    @property
    def update(self) -> Path:
        return self.path / self.UPDATE

    @property
    def delta(self) -> Path:
        return self.path / self.DELTA

    @property
    def cca_test(self) -> Path:
        return self.path / self.CCA_TEST

    @property
    def loglik_test(self) -> Path:
        """The test problems' gold-solution log-likelihoods, base and updated (``cca_eval``)."""
        return self.path / self.LOGLIK_TEST

    @property
    def stages(self) -> Path:
        return self.path / self.STAGES

    @property
    def report_json(self) -> Path:
        return self.path / self.REPORT_JSON

    @property
    def report_md(self) -> Path:
        return self.path / self.REPORT_MD

    @property
    def components_png(self) -> Path:
        return self.path / self.COMPONENTS_PNG

    # ---- contents ------------------------------------------------------------------------------
    def check_config(self, config: "RunConfig", *, write: bool = True) -> None:
        """Write ``config.json``, or check that a resumed run uses the same configuration
        (``write=False``: only that check)."""
        from cca_fast.experiments.config import RunConfig

        check_or_write_config(self.config, config.to_dict(), RunConfig().to_dict(), str(self.path), write=write)


    def check_model_identity(self, identity: dict[str, Any]) -> None:
        """Record ``identity`` (:func:`~cca_fast.models.identity.model_identity`) at the first
        run; on resume, refuse weights whose digest differs from the recorded one (a digest
        unknown on either side is not compared, and an unknown recorded one is filled in)."""
        path = self.path / self.MODEL_IDENTITY
        old = read_json(path) if path.exists() else {}
        if old.get("digest") and identity.get("digest") and old["digest"] != identity["digest"]:
            raise CCAError(
                f"the weights behind --model changed since {self.path} was started: recorded "
                f"{old.get('model')} ({old.get('location')}) with identity {old['digest'][:16]}, now "
                f"{identity.get('model')} ({identity.get('location')}) with identity {identity['digest'][:16]}; "
                "its finished stages belong to the old weights: use a new --output directory, "
                f"or delete {self.path} to start over")
        if not old.get("digest"):
            atomic_write_json(path, identity)

    def made_with(self) -> dict[str, dict[str, Any]]:
        """``{step name: the configuration dict its outputs were made with}`` (``made_with.json``;
        empty for a run directory of an older version, whose steps are then not checked)."""
        path = self.path / self.MADE_WITH
        return read_json(path) if path.exists() else {}

    def record_made_with(self, step: str, config: dict[str, Any]) -> None:
        """Record that step ``step``'s outputs are made with ``config`` (a ``RunConfig.to_dict()``),
        before the step writes them, so that partial outputs are covered too."""
        records = self.made_with()
        if records.get(step) != config:
            atomic_write_json(self.path / self.MADE_WITH, {**records, step: config})

    def read_split(self, split: str) -> list["Problem"]:
        """The problems of ``data/<split>.jsonl``."""
        from cca_fast.data.loaders import read_problems_jsonl

        return read_problems_jsonl(self.split(split))

    def write_training_set(self, weak_templates: list[str], problem_ids: list[str]) -> None:
        atomic_write_json(self.training_set_file, {"weak_templates": weak_templates, "problem_ids": problem_ids})

    def read_training_set(self) -> dict[str, list[str]]:
        """``{"weak_templates": [...], "problem_ids": [...]}``: what stage 1 trained on."""
        if not self.training_set_file.exists():
            raise CCAError(f"{self.training_set_file} does not exist: run stage 1 first "
                           f"(cca run --until traces --output {self.path})")
        return read_json(self.training_set_file)

    def seconds(self) -> dict[str, float]:
        return read_json(self.stages) if self.stages.exists() else {}

    def record_seconds(self, stage: str, seconds: float) -> None:
        add_seconds(self.stages, stage, seconds)

    def __repr__(self) -> str:  # pragma: no cover
        return f"RunDir({str(self.path)!r})"


class StudyDir(_Folder):
    """Files of one ``cca study`` directory, by name (relative names in the class attributes):

    =============================  ================================================================
    ``study_config.json``          the :class:`~cca_fast.experiments.study.StudyConfig`
    ``phases.json``                seconds per phase (shared steps, each condition, LoRA, suites)
    ``model_info.json``            parameter count and ``model_type`` of the model
    ``shared/``                    a run directory (:class:`RunDir`) holding the shared steps
    ``<condition>/``               one run directory per CCA condition
    ``lora/``                      ``adapter/``, ``lora.json``, ``eval_test.jsonl``
    ``side_effects/<name>.json``   the side-effect suites of each condition (and ``base``)
    ``study.json``, ``study.md``, ``study.png``  the comparison table
    ``run.lock``                   held by the one process writing the study (see :mod:`.lock`)
    =============================  ================================================================
    """

    CONFIG = "study_config.json"
    PHASES = "phases.json"
    MODEL_INFO = "model_info.json"
    SHARED = "shared"
    LORA = "lora"
    LORA_ADAPTER = "adapter"
    LORA_INFO = "lora.json"
    LORA_TEST = "eval_test.jsonl"
    SIDE_EFFECTS = "side_effects"
    STUDY_JSON = "study.json"
    STUDY_MD = "study.md"
    STUDY_PNG = "study.png"
    CREATE = False

    # ---- paths ---------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def phases(self) -> Path:
        return self.path / self.PHASES

    @property
    def model_info(self) -> Path:
        return self.path / self.MODEL_INFO

    def shared(self, *, create: bool = False) -> RunDir:
        """The shared run directory."""
        return RunDir(self.path / self.SHARED, create=create)

    def condition(self, name: str, *, create: bool = False) -> RunDir:
        """The run directory of CCA condition ``name``."""
        return RunDir(self.path / name, create=create)

    @property
    def lora(self) -> Path:
        return self.path / self.LORA

    @property
    def lora_adapter(self) -> Path:
        return self.lora / self.LORA_ADAPTER

    @property
    def lora_info(self) -> Path:
        return self.lora / self.LORA_INFO

    @property
    def lora_test(self) -> Path:
        return self.lora / self.LORA_TEST

    @property
    def side_effects(self) -> Path:
        return self.path / self.SIDE_EFFECTS

    def side_effect(self, name: str) -> Path:
        """The side-effect results of condition ``name`` (``"base"``: the base model)."""
        return self.side_effects / f"{name}.json"

    def test_records(self, name: str) -> Path:
        """The test-split evaluation records of condition ``name`` (``"base"``: the shared run's
        base evaluation; ``"lora"``: the merged LoRA model)."""
        if name == "base":
            return self.shared().base_test
        if name == "lora":
            return self.lora_test
        return self.condition(name).cca_test

    @property
    def study_json(self) -> Path:
        return self.path / self.STUDY_JSON

    @property
    def study_md(self) -> Path:
        return self.path / self.STUDY_MD

    @property
    def study_png(self) -> Path:
        return self.path / self.STUDY_PNG


    def __repr__(self) -> str:  # pragma: no cover
        return f"StudyDir({str(self.path)!r})"
