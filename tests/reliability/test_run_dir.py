"""Issue 13, point 7: one writer per run directory (``run.lock``: a live holder is refused with
its pid and the fix, a dead one's lock is taken over, the lock is released on exit and on
exceptions), and a resumed run notices that the weights behind ``--model`` changed
(``model_identity.json``)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run_argv

from cca_fast.cli.main import main
from cca_fast.errors import CCAError
from cca_fast.experiments.lock import LOCK_NAME, dir_lock
from cca_fast.experiments.study import StudyConfig, run_study
from cca_fast.models.identity import model_identity


@pytest.fixture
def sleeper():
    """A live process of this host (its pid holds the lock of the tests)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(directory, pid: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))


def test_a_live_writer_is_refused(workdir, tmp_path, capsys, sleeper):
    out = tmp_path / "run"
    _write_lock(out, sleeper)
    assert main(run_argv(workdir, out, "--until", "data")) == 2
    err = capsys.readouterr().err
    assert f"in use by another cca process (pid {sleeper}" in err  # the cause
    assert "use another --output directory" in err and f"delete {out / LOCK_NAME}" in err  # the fixes
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == sleeper  # its lock untouched


def test_a_writer_killed_while_holding_the_lock_does_not_block(workdir, tmp_path, capsys):
    import cca_fast

    out = tmp_path / "run"
    code = ("import time\nfrom cca_fast.experiments.lock import dir_lock\n"
            f"with dir_lock({str(out)!r}):\n    print('locked', flush=True)\n    time.sleep(60)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(cca_fast.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert writer.stdout.readline().strip() == "locked"
        assert main(run_argv(workdir, out, "--until", "data")) == 2  # a second writer is refused
        assert f"pid {writer.pid}" in capsys.readouterr().err
    finally:
        writer.kill()  # SIGKILL: no clean-up runs, the lock file stays behind
        writer.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == writer.pid
    assert main(run_argv(workdir, out, "--until", "data")) == 0
    assert f"taking over a stale lock of pid {writer.pid}" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists()


def test_a_dead_writers_lock_is_taken_over(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    pid = _dead_pid()
    _write_lock(out, pid)
    assert main(run_argv(workdir, out, "--until", "data")) == 0
    assert f"taking over a stale lock of pid {pid} (no longer running)" in capsys.readouterr().err
    assert (out / "data" / "val.jsonl").exists() and not (out / LOCK_NAME).exists()  # released on exit


def test_the_lock_is_released_on_an_exception(workdir, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def broken(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr("cca_fast.models.loading.load_model", broken)
    with pytest.raises(RuntimeError):
        main(run_argv(workdir, out, "--until", "base_eval"))
    assert not (out / LOCK_NAME).exists()
    # the model loads (and the selection size is checked against it) before config.json is written:
    # a failed load leaves nothing that would refuse the next attempt
    assert not (out / "config.json").exists()
    monkeypatch.undo()
    assert main(run_argv(workdir, out, "--until", "data")) == 0  # the next attempt runs
    assert (out / "config.json").exists() and (out / "data" / "train.jsonl").exists()


def test_one_writer_per_directory_in_one_process_and_for_a_study(tmp_path, sleeper):
    with dir_lock(tmp_path / "a", say=lambda m: None):
        with pytest.raises(CCAError, match="in use by another cca process"):
            with dir_lock(tmp_path / "a", say=lambda m: None):
                pass
    assert not (tmp_path / "a" / LOCK_NAME).exists()
    _write_lock(tmp_path / "study", sleeper)
    with pytest.raises(CCAError, match=f"pid {sleeper}"):
        run_study(StudyConfig(output=str(tmp_path / "study")), progress=False)
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == [LOCK_NAME]


def _perturb(model_dir) -> None:
    """Change one weight of the saved model (as re-training or a new download would)."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + torch.ones_like(tensors[name]) * 1e-3
    save_file(tensors, path, metadata={"format": "pt"})


def test_changed_weights_are_refused_on_resume(workdir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(workdir / "model", model)
    out = tmp_path / "run"
    argv = run_argv(workdir, out, "--until", "data")
    argv[argv.index("--model") + 1] = str(model)
    assert main(argv) == 0
    recorded = json.loads((out / "model_identity.json").read_text())
    assert recorded == model_identity(str(model)) and recorded["digest"]
    kept = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(argv) == 0  # the same weights resume
    _perturb(model)
    assert main(argv) == 2
    err = capsys.readouterr().err
    now = model_identity(str(model))["digest"]
    assert "the weights behind --model changed" in err  # the cause, both identities, the fixes
    assert recorded["digest"][:16] in err and now[:16] in err
    assert "use a new --output directory" in err and f"delete {out}" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == kept  # nothing lost or rewritten


def test_model_identity_is_cheap_and_deterministic(tmp_path):
    big = tmp_path / "m" / "model.safetensors"
    big.parent.mkdir()
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20], "data_offsets": [0, 4 << 20]}}).encode()
    data = bytearray(os.urandom(4 << 20))
    big.write_bytes(len(header).to_bytes(8, "little") + header + bytes(data))
    (big.parent / "config.json").write_text('{"model_type": "llama"}')
    first = model_identity(str(big.parent))
    assert model_identity(str(big.parent)) == first
    data[len(data) // 2 + 100] ^= 0xFF  # a byte inside the middle sample
    big.write_bytes(len(header).to_bytes(8, "little") + header + bytes(data))
    assert model_identity(str(big.parent))["digest"] != first["digest"]
    (big.parent / "config.json").write_text('{"model_type": "qwen2"}')
    assert len({model_identity(str(big.parent))["digest"], first["digest"]}) == 2
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    assert model_identity(str(gguf))["digest"] != model_identity(str(big.parent))["digest"]
    assert model_identity("no-such-org/no-such-model-xyz")["digest"] is None  # not cached: not compared


def test_a_study_condition_inherits_the_shared_runs_identity(tmp_path):
    from cca_fast.experiments.study import seed_from_shared

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "model_identity.json").write_text('{"model": "m", "location": "/m", "digest": "abc"}')
    seed_from_shared(shared, tmp_path / "dcm")  # weights changed later are noticed in the condition too
    assert (tmp_path / "dcm" / "model_identity.json").read_text() == (shared / "model_identity.json").read_text()


def test_the_default_models_identity_is_its_gguf_file():
    from cca_fast.models.loading import default_gguf_path

    try:
        gguf = default_gguf_path()
    except CCAError:
        pytest.skip("the embedded default model is not installed")
    ident = model_identity(None)
    assert ident == model_identity("default") and ident["location"] == str(gguf) and len(ident["digest"]) == 64
