"""``cca run``: every step of CCA end to end, resumable from a run directory.

:func:`run_cca` checks the :class:`~cca_fast.experiments.config.RunConfig` and, for a new run,
its data splits (an empty one is refused), takes the run directory's lock (one writer), writes (or
checks) ``config.json`` and the identity of the weights behind ``--model``
(``model_identity.json``), runs the data step, loads the model and runs the other steps of
:mod:`cca_fast.experiments.steps` in order; a step whose outputs are complete is read back,
not recomputed. The files are named by
:class:`~cca_fast.experiments.rundir.RunDir` (see its module for the layout).

Under ``torchrun --nproc_per_node N`` stage 1's generation (base evaluation of the training and
test splits, trace sampling, branching completions, greedy-path forks) is shared out across the
``N`` ranks by whole generation batches / problems, each computed exactly as one process computes
it; rank 0 gathers the results and alone writes the run directory, so its files are those of one
process. The other ranks return after stage 1 and rank 0 runs stages 2 and 3 alone (see
:mod:`cca_fast.experiments.steps`).
"""
from __future__ import annotations

from cca_fast.distributed import Dist
from cca_fast.errors import CCAError
from cca_fast.experiments.config import (PROCEDURES, SELECTORS, GenerationSettings, ProcedureSettings,  # noqa: F401
                                         RunConfig, procedure_settings)
from cca_fast.experiments.report import RunReport
from cca_fast.experiments.rundir import SPLITS, RunDir
from cca_fast.experiments.steps import STEP_NAMES, STEPS, RunContext, check_made_with, run_steps
from cca_fast.experiments.steps.data import check_splits, make_splits
from cca_fast.experiments.steps.evaluation import eval_resumable  # noqa: F401  (re-exported)
from cca_fast.experiments.steps.localize import localize  # noqa: F401  (re-exported)
from cca_fast.experiments.steps.pivots import find_pivots, training_problems  # noqa: F401  (re-exported)
from cca_fast.generation.prefix import PrefixCache
from cca_fast.models.components import ComponentSpace

__all__ = ["RunConfig", "GenerationSettings", "RunDir", "RunReport", "ProcedureSettings", "procedure_settings", "run_cca",
           "STEP_NAMES", "SELECTORS", "PROCEDURES", "eval_resumable", "training_problems", "find_pivots", "localize"]


# ---- the run -------------------------------------------------------------------------------------
def run_cca(config: RunConfig, *, until: str | None = None, progress: bool = True) -> RunReport | None:
    """Run (or resume) every step of CCA; returns the :class:`RunReport` (``None`` when stopped
    by ``until``, and on every rank but 0 under ``torchrun``).

    Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is started here
    (:func:`cca_fast.distributed.init_from_env`; the caller may destroy it with
    :func:`cca_fast.distributed.shutdown`). Rank 0 makes every check and holds the run
    directory's lock, then tells the other ranks to go on (or why not); every rank loads the
    model (each on its own GPU when there are GPUs) and stage 1's generation is shared out across
    the ranks, rank 0 writing every file (see :mod:`cca_fast.experiments.steps`). The other ranks
    return after stage 1; rank 0 runs the rest.

    Args:
        config: the run's :class:`RunConfig`; ``config.output`` is the run directory. Checked
            (:meth:`RunConfig.validate`) before anything is written or loaded.
        until: stop after this step (one of :data:`STEP_NAMES`).

    Raises:
        CCAError: a bad configuration, an empty split, a run directory in use by another
            process, or a resumed run whose configuration or weights changed (on rank 0; the
            other ranks raise a CCAError that names rank 0's).
    """
    from cca_fast.distributed import init_from_env

    config.validate()
    if until is not None and until not in STEP_NAMES:
        raise CCAError(f"unknown step {until!r} (--until); steps: {', '.join(STEP_NAMES)}")
    dist = init_from_env()
    if dist.main:
        return _run_main(config, until, progress, dist)
    return _run_follower(config, until, progress, dist)


def _run_main(config: RunConfig, until: str | None, progress: bool, dist: Dist) -> RunReport | None:
    """:func:`run_cca` on rank 0 (the only rank outside ``torchrun``): the checks, the lock, the
    writes, every step."""
    import time

    from cca_fast.distributed import rank_device
    from cca_fast.io import check_writable_dir
    from cca_fast.models.identity import model_identity
    from cca_fast.models.loading import load_model

    # every check comes before config.json is written: a refused command leaves nothing behind
    # that would refuse the corrected one (values, the files the run reads, the folder, the splits)
    announced = False  # whether the other ranks were told to go on
    try:
        config.check_inputs()
        check_writable_dir(config.output, "--output")
        rd = RunDir(config.output, create=False)
        # a new run's splits are made and checked now; an older run's are read and checked (cheap)
        pending = None if all(rd.split(s).exists() for s in SPLITS) else make_splits(config)
        if pending is None:
            check_splits(*(rd.read_split(s) for s in SPLITS), config)
        rd = RunDir(config.output)
        with rd.lock():
            rd.check_config(config, write=False)  # another configuration: refused before the load
            check_made_with(STEPS, rd, config)  # config.json edited after steps ran: refused too
            rd.check_model_identity(model_identity(config.model))
            if until == STEPS[0].name:  # the data step needs no model (and no other rank)
                dist.broadcast_object(None)
                announced = True
                rd.check_config(config)
                run_steps(STEPS[:1], RunContext(config, rd, progress, pending_splits=pending))
                return None
            t = time.perf_counter()
            model, tok = load_model(config.model, dtype=config.dtype, device=rank_device(config.device),
                                    attn_implementation=config.attn_implementation)
            space = ComponentSpace(model)
            config.check_model_size(space.total)
            rd.check_config(config)
            # checked, config.json written: the other ranks load the model and follow
            dist.broadcast_object(None)
            announced = True
            # the exemplars' key/values, computed once per weights (unused by the reference procedure,
            # which shares no prefix); every step passes it to its generation calls
            ctx = RunContext(config, rd, progress, model=model, tokenizer=tok, space=space,
                             prefix_cache=PrefixCache(), pending_splits=pending, dist=dist)
            rd.record_seconds("load_model", time.perf_counter() - t)
            return run_steps(STEPS, ctx, until=until)
    except Exception as e:
        if not announced:  # the other ranks stop too, naming the reason
            dist.broadcast_object(str(e) if isinstance(e, CCAError) else f"{type(e).__name__}: {e}")
        raise


def _run_follower(config: RunConfig, until: str | None, progress: bool, dist: Dist) -> None:
    """:func:`run_cca` on a rank other than 0: wait for rank 0's checks, load the model on this
    rank's device, compute this rank's share of stage 1 (writing nothing) and return ``None``."""
    from cca_fast.distributed import rank_device
    from cca_fast.models.loading import load_model

    refused = dist.broadcast_object()
    if refused is not None:
        raise CCAError(f"rank 0 refused the run: {refused}")
    if until == STEPS[0].name:
        return None
    model, tok = load_model(config.model, dtype=config.dtype, device=rank_device(config.device),
                            attn_implementation=config.attn_implementation)
    ctx = RunContext(config, RunDir(config.output, create=False), progress, model=model, tokenizer=tok,
                     space=ComponentSpace(model), prefix_cache=PrefixCache(), dist=dist)
    run_steps(STEPS, ctx, until=until)
    return None
