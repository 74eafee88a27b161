"""``cca run`` under ``torchrun``: stage 1's generation shared out across ranks gives the files of
one process, and resumes.

:func:`cca_fast.distributed.sharded` is tested on threads standing in for ranks (a
:class:`ThreadDist` whose gather is a thread barrier); the command itself runs as a 2-process gloo
``torchrun`` on the tiny biased llama of ``test_pipeline.py`` (``helpers.make_pipeline_workdir``),
compared with one process run the same way (``OMP_NUM_THREADS=1`` for both, as torchrun sets it).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import cca_fast.experiments.steps.evaluation as evaluation_step
from cca_fast.data.problem import Problem
from cca_fast.distributed import Dist, sharded
from cca_fast.evaluation.prompting import PromptConfig
from cca_fast.generation.decode import GenerationConfig
from cca_fast.generation.prefix import PrefixCache
from cca_fast.io import read_jsonl
from cca_fast.models.loading import load_model
from helpers import run_argv

REPO = Path(__file__).resolve().parents[1]

#: stage 1's files (and the data stage's), identical byte for byte to one process's
STAGE1_FILES = ("data/train.jsonl", "data/val.jsonl", "data/test.jsonl", "eval_base_train.jsonl",
                "eval_base_test.jsonl", "training_set.json", "traces.jsonl", "pivots.jsonl",
                "training_examples.json")


# ---- the sharding helper, on threads -----------------------------------------------------------------
@dataclass
class _Hub:
    """What the threads of one fake process group share: a slot per rank and a barrier."""

    world: int
    slots: list[Any] = field(default_factory=list)
    barrier: threading.Barrier = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.slots = [None] * self.world
        self.barrier = threading.Barrier(self.world, timeout=120)


@dataclass(frozen=True)
class ThreadDist(Dist):
    """A rank of ``world`` threads: ``all_gather_object`` through a shared :class:`_Hub`."""

    hub: _Hub | None = None

    def all_gather_object(self, obj: Any) -> list[Any]:
        self.hub.slots[self.rank] = obj
        self.hub.barrier.wait()
        out = list(self.hub.slots)
        self.hub.barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return out

    def barrier(self) -> None:
        self.hub.barrier.wait()


def _on_threads(world: int, fn) -> list[Any]:
    """``fn(dist)`` on ``world`` threads (one :class:`ThreadDist` each); their results by rank."""
    hub, out, errors = _Hub(world), [None] * world, []

    def body(rank: int) -> None:
        try:
            out[rank] = fn(ThreadDist(rank, world, hub))
        except BaseException as e:  # noqa: BLE001  (re-raised below, in the test's thread)
            errors.append(e)
            hub.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize("world,n", [(1, 5), (2, 5), (3, 7), (4, 2), (3, 0)])
def test_sharded_owner_computes_and_everyone_gets_one_process_order(world, n):
    """Unit ``i`` is computed once, by rank ``i % world``; every rank yields every unit's result
    in unit order (a last round with fewer units than ranks included)."""
    units = [f"u{i}" for i in range(n)]
    computed: dict[int, list[str]] = {r: [] for r in range(world)}

    def run(dist: Dist) -> list[tuple[str, str]]:
        def compute(u: str) -> str:
            computed[dist.rank].append(u)
            return u.upper()

        return list(sharded(dist, units, compute))

    results = _on_threads(world, run)
    assert all(r == [(u, u.upper()) for u in units] for r in results)
    assert computed == {r: [u for i, u in enumerate(units) if Dist(r, world).owns(i)] for r in range(world)}


def test_sharded_one_rank_is_a_plain_loop():
    seen = []
    assert list(sharded(Dist(), [3, 1, 2], lambda u: seen.append(u) or -u)) == [(3, -3), (1, -1), (2, -2)]
    assert seen == [3, 1, 2]


def test_eval_resumable_sharded_equals_one_process_and_skips_written_items(workdir, tmp_path, monkeypatch):
    """Two thread-ranks evaluate the chunks of the problems not yet in the file (each chunk once,
    none of the written ones), rank 0 alone appends them in one process's order, and the records
    equal one process's bit for bit (same chunks, and an emptied prefix cache before each)."""
    model, tok = load_model(str(workdir / "model"), dtype="float32", device="cpu")
    rows = [json.loads(line) for line in (workdir / "data.jsonl").read_text().splitlines()][:11]
    problems = [Problem(r["id"], r["question"], r["answer"], float(r["gold"]), r["template"]) for r in rows]
    prompt = PromptConfig(exemplars=str(workdir / "shots.json"), n_shots=1)
    gen = GenerationConfig(max_new_tokens=8, batch_size=2)
    monkeypatch.setattr(evaluation_step, "CHUNK_ROWS", 2)  # chunks of 2 * 2 = 4 problems

    one = tmp_path / "one.jsonl"
    expected = evaluation_step.eval_resumable(model, tok, problems, prompt, gen, one, "one", progress=False,
                                       prefix_cache=PrefixCache())
    # a resumed file: the first 3 records written, the rest to compute (chunks of 4: 4, 4)
    two = tmp_path / "two.jsonl"
    two.write_text("".join(one.read_text().splitlines(keepends=True)[:3]))
    calls: list[list[str]] = []
    real = evaluation_step.generate

    def spy(m, t, ids, *a, **k):
        calls.append([tok.decode(x) for x in ids])
        return real(m, t, ids, *a, **k)

    monkeypatch.setattr(evaluation_step, "generate", spy)
    got = _on_threads(2, lambda d: evaluation_step.eval_resumable(model, tok, problems, prompt, gen, two, "two",
                                                           progress=False, prefix_cache=PrefixCache(), dist=d))
    assert got[0] == got[1] == expected
    assert [r["id"] for r in got[0]] == [p.id for p in problems]
    assert two.read_bytes() == one.read_bytes()  # one process's records, in its order, written once
    assert sorted(len(c) for c in calls) == [4, 4]  # the 8 unwritten problems, each in one chunk
    computed = [q for c in calls for q in c]
    assert not any(p.question in q for p in problems[:3] for q in computed)  # the written 3: not recomputed


def test_eval_parts_decode_splits_together_as_each_alone(workdir, tmp_path, monkeypatch):
    """Two splits decoded in one sequence of chunks give each split's records as its own
    evaluation does (token ids included where kept), each appended to its own file; a split
    already written is read back, not recomputed, and the other's problems fill one call."""
    model, tok = load_model(str(workdir / "model"), dtype="float32", device="cpu")
    rows = [json.loads(line) for line in (workdir / "data.jsonl").read_text().splitlines()][:9]
    problems = [Problem(r["id"], r["question"], r["answer"], float(r["gold"]), r["template"]) for r in rows]
    prompt = PromptConfig(exemplars=str(workdir / "shots.json"), n_shots=1)
    gen = GenerationConfig(max_new_tokens=8, batch_size=3)
    a, b = problems[:5], problems[5:]
    alone_a = evaluation_step.eval_resumable(model, tok, a, prompt, gen, None, "a", progress=False,
                                             prefix_cache=PrefixCache())
    alone_b = evaluation_step.eval_resumable(model, tok, b, prompt, gen, None, "b", progress=False, keep_ids=False,
                                             prefix_cache=PrefixCache())
    calls: list[int] = []
    real = evaluation_step.generate

    def spy(m, t, ids, *args, **kw):
        calls.append(len(ids))
        return real(m, t, ids, *args, **kw)

    monkeypatch.setattr(evaluation_step, "generate", spy)
    pa, pb = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    got_a, got_b = evaluation_step.base_eval_records(model, tok, a, b, prompt, gen, pa, pb, progress=False,
                                                     prefix_cache=PrefixCache())
    assert calls == [9]  # both splits in one chunk (4 * 3 rows = 12 >= 9): one generation call, one tail
    assert got_a == alone_a and got_b == alone_b
    assert "output_ids" in got_a[0] and "output_ids" not in got_b[0]
    assert [json.loads(x)["id"] for x in pa.read_text().splitlines()] == [p.id for p in a]
    assert [json.loads(x)["id"] for x in pb.read_text().splitlines()] == [p.id for p in b]
    calls.clear()
    pb.unlink()
    again_a, again_b = evaluation_step.base_eval_records(model, tok, a, b, prompt, gen, pa, pb, progress=False,
                                                         prefix_cache=PrefixCache())
    assert calls == [4] and again_a == got_a and again_b == got_b  # split a read back, split b recomputed


# ---- the command under torchrun ---------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _one_process(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "cca_fast.cli", *argv], env=_env(), capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _two_processes(argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cca_fast.cli", *argv]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _assert_same_files(a: Path, b: Path) -> None:
    for name in STAGE1_FILES:
        assert (b / name).read_bytes() == (a / name).read_bytes(), name
    config_a, config_b = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert {**config_b, "output": None} == {**config_a, "output": None}  # only the directory differs
    assert not list(b.glob("*.tmp*")) and not (b / "selection.json").exists()


@pytest.mark.slow
def test_torchrun_stage1_two_processes_equal_one_and_resume(workdir, tmp_path):
    """``cca run --until examples --pivot-source both`` (base evaluation, traces, branching pivots,
    greedy-path forks) on 2 gloo ranks writes exactly the files of one process; and from the same
    interrupted run directory (some evaluations, traces and pivots written, the rest not) a
    2-rank resume keeps the written lines and again equals a 1-process resume."""
    extra = ("--until", "examples", "--pivot-source", "both", "--k", "4")
    one, two = tmp_path / "one", tmp_path / "two"
    _one_process(run_argv(workdir, one, *extra))
    _two_processes(run_argv(workdir, two, *extra))
    _assert_same_files(one, two)
    assert len(list(read_jsonl(two / "pivots.jsonl"))) > 0
    assert json.loads((two / "training_examples.json").read_text())["stats"]["fork"]["problems"] > 0

    # an interrupted run: the test evaluation, the traces and the pivots cut short
    cut = tmp_path / "cut"
    shutil.copytree(one, cut)
    for name in ("eval_base_test.jsonl", "traces.jsonl", "pivots.jsonl"):
        lines = (cut / name).read_text().splitlines(keepends=True)
        (cut / name).write_text("".join(lines[: len(lines) // 3]))
    (cut / "training_examples.json").unlink()
    kept = {n: (cut / n).read_text() for n in ("eval_base_test.jsonl", "traces.jsonl", "pivots.jsonl")}
    resumed_one, resumed_two = tmp_path / "resumed_one", tmp_path / "resumed_two"
    shutil.copytree(cut, resumed_one)
    shutil.copytree(cut, resumed_two)
    _one_process(run_argv(workdir, resumed_one, *extra))
    _two_processes(run_argv(workdir, resumed_two, *extra))
    _assert_same_files(resumed_one, resumed_two)
    for name, text in kept.items():  # the written lines are kept (nothing rewritten, no duplicates)
        now = (resumed_two / name).read_text()
        assert now.startswith(text), name
        ids = [r.get("id", r.get("problem_id")) for r in read_jsonl(resumed_two / name)]
        assert len(ids) == len(set(ids)), name


def test_torchrun_refusal_on_rank_0_stops_every_rank(workdir, tmp_path):
    """A run directory of another configuration is refused on rank 0 before any model is loaded,
    and the other rank stops with rank 0's reason instead of waiting."""
    out = tmp_path / "run"
    _one_process(run_argv(workdir, out, "--until", "data"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cca_fast.cli", *run_argv(workdir, out, "--until", "base_eval", "--seed", "1")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode != 0
    assert "different configuration" in proc.stderr
    assert "rank 0 refused the run" in proc.stderr


# ---- the teardown: every rank leaves the process group together --------------------------------------------
@dataclass(frozen=True)
class _LoggedDist(ThreadDist):
    """A :class:`ThreadDist` whose ``leave`` is logged (rank, and the steps each rank ran before)."""

    log: list = None  # type: ignore[assignment]

    def leave(self) -> None:
        self.log.append(("leave", self.rank))
        super().leave()  # the thread barrier, then shutdown() (no group here: a no-op)


@dataclass
class _Step:
    name: str
    all_ranks: bool
    outputs: tuple = ()
    ignores: tuple = ()
    log: list = None  # type: ignore[assignment]

    def load(self, ctx):
        return None

    def run(self, ctx):
        self.log.append((self.name, ctx.dist.rank, ctx.dist.world))
        return ctx.dist.all_gather_object(self.name)  # a collective on the shared steps; one rank after


@pytest.mark.parametrize("until", [None, "b"])
def test_every_rank_leaves_the_group_together_where_the_shared_steps_end(tmp_path, until):
    """At the first step only rank 0 runs (or after ``until`` among the shared steps), every rank
    calls ``Dist.leave`` (a barrier, then the group destroyed), nobody before the last shared
    step's collective is done; rank 1 returns and rank 0 runs the rest as one process."""
    from cca_fast.experiments.config import RunConfig
    from cca_fast.experiments.rundir import RunDir
    from cca_fast.experiments.steps.loop import RunContext, run_steps

    log: list = []
    steps = [_Step("a", True, log=log), _Step("b", True, log=log), _Step("c", False, log=log)]
    hub = _Hub(2)

    def rank(d: ThreadDist):
        dist = _LoggedDist(d.rank, d.world, hub, log)
        ctx = RunContext(RunConfig(output=str(tmp_path)), RunDir(tmp_path / f"r{d.rank}"), progress=False, dist=dist)
        return run_steps(steps, ctx, until=until), ctx.dist

    (r0, d0), (r1, d1) = _on_threads(2, rank)
    leaves = [i for i, e in enumerate(log) if e[0] == "leave"]
    assert sorted(log[i][1] for i in leaves) == [0, 1]  # both ranks, once each
    assert max(i for i, e in enumerate(log) if e[0] == "b") < min(leaves)  # after the last shared step
    assert r1 is None and d0.world == 1 and d1.world == 1  # no group is left on either rank
    if until is None:
        assert log[-1] == ("c", 0, 1) and r0 == ["c"]  # rank 0 alone, as one process
    else:
        assert r0 is None and not any(e[0] == "c" for e in log)


@pytest.mark.slow
def test_torchrun_teardown_beside_a_cpu_burning_process(workdir, tmp_path):
    """The teardown race (rank 1 aborting with "terminate called without an active exception"
    while other work loaded the machine): 2 gloo ranks, beside a process burning a CPU (it stops
    by itself after 10 minutes at most), end after stage 1 (``--until examples``) and leave rank 0
    alone for stage 2 (``--until localize``), each run twice; every run exits 0 without an abort."""
    burner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 600\n"
                               "while time.time() < end: pass"])
    try:
        for until in ("examples", "localize", "examples", "localize"):
            out = tmp_path / f"run-{until}"
            shutil.rmtree(out, ignore_errors=True)
            proc = _two_processes(run_argv(workdir, out, "--until", until, "--pivot-source", "both", "--k", "4"))
            assert "terminate called" not in proc.stderr and "SIGABRT" not in proc.stderr, proc.stderr[-3000:]
            assert (out / "training_examples.json").exists()
            assert (out / "selection.json").exists() == (until == "localize")
    finally:
        burner.kill()
        burner.wait()


@pytest.mark.parametrize("size", [1, 3, 4, 128])
def test_balanced_chunks_cover_in_order_without_a_small_remainder(size):
    """Every item once, in order; round(n / size) chunks (at least one) whose lengths differ by at
    most one and lie in [size / 2, 1.5 * size] once there are at least size / 2 items (the default
    run's 136 training problems at 64 slots: one chunk, not 128 + 8)."""
    for n in range(0, 5 * size + 3):
        chunks = evaluation_step.balanced_chunks(list(range(n)), size)
        assert [x for c in chunks for x in c] == list(range(n))
        if n == 0:
            assert chunks == []
            continue
        assert len(chunks) == max(1, round(n / size))
        lens = [len(c) for c in chunks]
        assert max(lens) - min(lens) <= 1
        if n >= size / 2:
            assert size / 2 <= min(lens) and max(lens) <= 1.5 * size
    assert [len(c) for c in evaluation_step.balanced_chunks(list(range(136)), 128)] == [136]
